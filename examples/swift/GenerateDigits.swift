// GenerateDigits.swift: images from sampler.mlpackage, written by
//     compress export zoo:digits --format coreml --out artifacts
// Add artifacts/sampler.mlpackage to the app target (Xcode compiles it to sampler.mlmodelc).
// The few-step solver runs inside the model: the app draws noise, calls predict once, reads `sample`.
// The interface is in sampler.coreml.json and in the model's metadata (diffusion_compress.*).
import CoreML
import Foundation

/// Standard normal noise from a seed (SplitMix64 + Box-Muller): the same seed gives the same images.
func standardNormal(count: Int, seed: UInt64) -> [Float] {
    var state = seed
    func uniform() -> Double {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return (Double((z ^ (z >> 31)) >> 11) + 0.5) / Double(1 << 53)
    }
    return (0..<count).map { _ in Float((-2 * log(uniform())).squareRoot() * cos(2 * Double.pi * uniform())) }
}

/// Returns one [H * W] array of grey levels in 0...1 per sample (the digits models have one channel).
func generateDigits(seed: UInt64 = 0, label: Int32? = nil, guidanceScale: Float? = nil) throws -> [[Float]] {
    let url = Bundle.main.url(forResource: "sampler", withExtension: "mlmodelc")!
    let model = try MLModel(contentsOf: url, configuration: MLModelConfiguration())
    let inputs = model.modelDescription.inputDescriptionsByName
    let shape = inputs["noise"]!.multiArrayConstraint!.shape  // [batch, channels, height, width]; the batch is fixed

    let noise = try MLMultiArray(shape: shape, dataType: .float32)
    for (i, value) in standardNormal(count: noise.count, seed: seed).enumerated() { noise[i] = NSNumber(value: value) }
    var features: [String: MLFeatureValue] = ["noise": MLFeatureValue(multiArray: noise)]

    if let labelShape = inputs["class_labels"]?.multiArrayConstraint?.shape {  // class-conditional models
        let labels = try MLMultiArray(shape: labelShape, dataType: .int32)
        for i in 0..<labels.count { labels[i] = NSNumber(value: label ?? Int32(i % 10)) }
        features["class_labels"] = MLFeatureValue(multiArray: labels)
    }
    if inputs["guidance_scale"] != nil {  // 0 unconditional, 1 conditional, > 1 stronger guidance
        let scale = try MLMultiArray(shape: [1], dataType: .float32)
        scale[0] = NSNumber(value: guidanceScale ?? defaultGuidanceScale(model))
        features["guidance_scale"] = MLFeatureValue(multiArray: scale)
    }

    let output = try model.prediction(from: MLDictionaryFeatureProvider(dictionary: features))
    let sample = output.featureValue(for: "sample")!.multiArrayValue!  // data range -1...1, not clipped
    let (batch, height, width) = (shape[0].intValue, shape[2].intValue, shape[3].intValue)
    return (0..<batch).map { b in
        (0..<height * width).map { p in
            let value = sample[[b, 0, p / width, p % width] as [NSNumber]].floatValue  // strided outputs: index, never offset
            return min(max((value + 1) / 2, 0), 1)
        }
    }
}

/// The guidance scale the model was exported with, from its metadata.
func defaultGuidanceScale(_ model: MLModel) -> Float {
    let metadata = model.modelDescription.metadata[.creatorDefinedKey] as? [String: String]
    guard let json = metadata?["diffusion_compress.guidance"]?.data(using: .utf8),
          let guidance = try? JSONSerialization.jsonObject(with: json) as? [String: Any],
          let scale = guidance["default_scale"] as? Double else { return 1 }
    return Float(scale)
}
