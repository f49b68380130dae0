// ChunkedDenoiser.swift: one denoiser call through the chained chunk packages of a Core ML export written with
//     compress export MODEL --format coreml --coreml-weights palettize6 --coreml-attention split-einsum --coreml-chunk-mb 1000 --out export
// NOT COMPILED HERE: written on Linux, where there is no Swift toolchain and Core ML cannot run; build it in Xcode
// (macOS 13 / iOS 16 or later) before relying on it.
//
// denoiser.coreml.json lists the chunks in run order. Each chunk's inputs name where they come from: "input" (the
// denoiser's own inputs: sample, timestep, encoder_hidden_states, ...) or the index of the earlier chunk whose output
// of that name it is. Tensors crossing a cut are float32 MLMultiArrays; the last chunk's outputs (prediction) are the
// denoiser's. An app's own scheduler loop calls this once per step (twice with classifier-free guidance, or once
// on a batch of two when the export's batch is 2). Load the chunks once; on iOS they may be loaded one at a time
// to keep only one chunk's weights resident.
import CoreML
import Foundation

struct ChunkedDenoiser {
    struct Chunk { let model: MLModel; let inputs: [String]; let outputs: [String] }
    let chunks: [Chunk]

    init(folder: URL, units: MLComputeUnits = .cpuAndNeuralEngine) throws {
        let sidecar = try JSONSerialization.jsonObject(with: Data(contentsOf: folder.appendingPathComponent("denoiser.coreml.json"))) as! [String: Any]
        let entries = sidecar["chunks"] as! [[String: Any]]
        let configuration = MLModelConfiguration()
        configuration.computeUnits = units  // split-einsum attention is laid out for the Neural Engine
        chunks = try entries.map { entry in
            let compiled = try MLModel.compileModel(at: folder.appendingPathComponent(entry["file"] as! String))
            return Chunk(model: try MLModel(contentsOf: compiled, configuration: configuration),
                         inputs: (entry["inputs"] as! [[String: Any]]).map { $0["name"] as! String },
                         outputs: (entry["outputs"] as! [[String: Any]]).map { $0["name"] as! String })
        }
    }

    /// inputs: the denoiser's inputs by name (as denoiser.coreml.json's "inputs" lists them); returns its outputs by name.
    func callAsFunction(_ inputs: [String: MLMultiArray]) throws -> [String: MLMultiArray] {
        var values = inputs  // every tensor made so far, by name: model inputs, then each chunk's outputs
        var last: [String: MLMultiArray] = [:]
        for chunk in chunks {
            let feeds = try MLDictionaryFeatureProvider(dictionary: chunk.inputs.reduce(into: [String: Any]()) { $0[$1] = values[$1]! })
            let out = try chunk.model.prediction(from: feeds)
            last = [:]
            for name in chunk.outputs {
                let value = out.featureValue(for: name)!.multiArrayValue!
                values[name] = value
                last[name] = value
            }
        }
        return last
    }
}
