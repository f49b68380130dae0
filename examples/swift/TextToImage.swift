// TextToImage.swift: prompt -> PNG with the Core ML packages of a text-to-image export, written by
//     compress export diffusers:PIPELINE_FOLDER --solver model --steps 8 --format coreml --out export
// NOT COMPILED HERE: written on Linux, where there is no Swift toolchain and Core ML cannot run; build it in Xcode
// (macOS 13 / iOS 16 or later) before relying on it. Its tokenizer is mirrored in Python and matches the
// `tokenizers` library on the exported tokenizer.json files (CLIP's byte-level BPE with and without merges).
//
// The export folder holds text_encoder(_2).mlpackage, sampler.mlpackage (the whole few-step sampler with the VAE
// decoder inside: one predict call gives the image), <kind>.coreml.json sidecars, tokenizer*/tokenizer.json and
// pipeline.json, which says how they chain. Names and shapes are read from those files, never hard-coded.
// Uses standardNormal(count:seed:) from GenerateDigits.swift. Core ML shapes are static: the batch is the export's.
import CoreGraphics
import CoreML
import Foundation
import ImageIO
import UniformTypeIdentifiers

func readJSON(_ url: URL) throws -> [String: Any] {
    try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
}

struct Sidecar: Decodable {
    struct Spec: Decodable { let name: String; let shape: [Int]; let dtype: String }
    let inputs: [Spec]
    let outputs: [Spec]
}

/// CLIP's tokenizer from tokenizer.json: NFC, whitespace runs to one space, lowercase, CLIP's split, byte-level
/// characters, BPE with "</w>" on each word's last symbol; then <bos> ids <eos>, truncated and padded to max_length.
/// (An app that already has a CLIP tokenizer can pass its ids instead: they must equal tokenizers' ids for this file.)
struct CLIPTokenizer {
    let vocab: [String: Int32]
    let ranks: [String: Int]  // "left right" -> merge priority (lower merges first)
    let bos: Int32, eos: Int32, pad: Int32, maxLength: Int
    static let split = try! NSRegularExpression(
        pattern: #"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"#)
    static let byteToChar: [String] = {  // GPT-2's bytes_to_unicode: printable bytes stay, the others move to 256...
        let printable = Set(Array(33...126) + Array(161...172) + Array(174...255))
        var extra = 0
        return (0..<256).map { b in
            let code = printable.contains(b) ? b : 256 + extra
            if !printable.contains(b) { extra += 1 }
            return String(Character(Unicode.Scalar(UInt32(code))!))
        }
    }()

    init(file: URL, info: [String: Any]) throws {
        let model = try readJSON(file)["model"] as! [String: Any]
        vocab = (model["vocab"] as! [String: Int]).mapValues { Int32($0) }
        var ranks = [String: Int]()
        for (i, merge) in (model["merges"] as! [Any]).enumerated() {  // "a b" in older files, ["a", "b"] in newer ones
            ranks[(merge as? String) ?? (merge as! [String]).joined(separator: " ")] = i
        }
        self.ranks = ranks
        bos = Int32(info["bos_id"] as! Int)
        eos = Int32(info["eos_id"] as! Int)
        pad = Int32(info["pad_id"] as! Int)
        maxLength = info["max_length"] as! Int
    }

    func encode(_ prompt: String) -> [Int32] {
        let text = prompt.precomposedStringWithCanonicalMapping
            .replacingOccurrences(of: #"\s+"#, with: " ", options: .regularExpression).lowercased()
        var ids: [Int32] = []
        for match in Self.split.matches(in: text, range: NSRange(text.startIndex..., in: text)) {
            let word = String(text[Range(match.range, in: text)!])
            if word == "<|startoftext|>" || word == "<|endoftext|>" { ids.append(vocab[word]!); continue }
            ids += bpe(word.utf8.map { Self.byteToChar[Int($0)] }).map { vocab[$0] ?? eos }  // unknown -> the unk token (eos)
        }
        ids = [bos] + ids.prefix(maxLength - 2) + [eos]
        return ids + Array(repeating: pad, count: maxLength - ids.count)
    }

    private func bpe(_ characters: [String]) -> [String] {
        var symbols = characters
        symbols[symbols.count - 1] += "</w>"
        while symbols.count > 1 {
            var best: (rank: Int, at: Int)? = nil
            for i in 0..<symbols.count - 1 {
                if let rank = ranks[symbols[i] + " " + symbols[i + 1]], rank < (best?.rank ?? Int.max) { best = (rank, i) }
            }
            guard let at = best?.at else { break }
            symbols[at] += symbols[at + 1]
            symbols.remove(at: at + 1)
        }
        return symbols
    }
}

/// Compiles a package once per launch; an app would compile at install time and keep the .mlmodelc (or let Xcode do it).
func loadModel(_ folder: URL, _ kind: String) throws -> MLModel {
    let compiled = try MLModel.compileModel(at: folder.appendingPathComponent("\(kind).mlpackage"))
    return try MLModel(contentsOf: compiled, configuration: MLModelConfiguration())
}

struct TextEncoder {
    let model: MLModel, tokenizer: CLIPTokenizer, pooled: Bool, idsShape: [Int]

    init(folder: URL, pipeline: [String: Any], entry: [String: Any]) throws {
        let name = entry["name"] as! String
        let info = (pipeline["tokenizers"] as! [String: Any])[entry["tokenizer"] as! String] as! [String: Any]
        tokenizer = try CLIPTokenizer(file: folder.appendingPathComponent(info["file"] as! String), info: info)
        model = try loadModel(folder, name)
        pooled = entry["pooled"] as! Bool
        let sidecar = try JSONDecoder().decode(Sidecar.self, from: Data(contentsOf: folder.appendingPathComponent("\(name).coreml.json")))
        idsShape = sidecar.inputs[0].shape  // [batch, max_length], int32 (Core ML has no int64 inputs)
    }

    /// hidden_states [B, L, D] and, for SDXL's second encoder, pooled [B, P]; the prompt is repeated over the batch.
    func callAsFunction(_ prompt: String) throws -> (hidden: MLShapedArray<Float>, pooled: MLShapedArray<Float>?) {
        let ids = Array(repeating: tokenizer.encode(prompt), count: idsShape[0]).flatMap { $0 }
        let input = MLMultiArray(MLShapedArray<Int32>(scalars: ids, shape: idsShape))
        let out = try model.prediction(from: MLDictionaryFeatureProvider(dictionary: ["input_ids": MLFeatureValue(multiArray: input)]))
        let array = { (name: String) in out.featureValue(for: name)?.multiArrayValue.map { MLShapedArray<Float>(converting: $0) } }
        return (array("hidden_states")!, pooled ? array("pooled") : nil)
    }
}

/// SDXL joins both encoders' hidden states along the last axis (pipeline.json: "concat(axis=-1)").
func concatLastAxis(_ parts: [MLShapedArray<Float>]) -> MLShapedArray<Float> {
    let widths = parts.map { $0.shape.last! }, rows = parts[0].scalarCount / widths[0]
    let scalars = parts.map { $0.scalars }  // row-major, whatever the strides of the model's output
    var joined = [Float]()
    for r in 0..<rows { for (p, w) in widths.enumerated() { joined += scalars[p][r * w ..< (r + 1) * w] } }
    return MLShapedArray(scalars: joined, shape: Array(parts[0].shape.dropLast()) + [widths.reduce(0, +)])
}

/// The sampler's text inputs for one prompt: encoder_hidden_states and, for SDXL, text_embeds.
func encode(_ prompt: String, _ encoders: [TextEncoder]) throws -> [String: MLShapedArray<Float>] {
    var hidden: [MLShapedArray<Float>] = [], features: [String: MLShapedArray<Float>] = [:]
    for encoder in encoders {
        let (states, pooled) = try encoder(prompt)
        hidden.append(states)
        if let pooled { features["text_embeds"] = pooled }
    }
    features["encoder_hidden_states"] = concatLastAxis(hidden)
    return features
}

/// One image per sample of the exported batch; the same seed gives the same images.
func generateImages(folder: URL, prompt: String, negativePrompt: String? = nil, seed: UInt64 = 0, guidanceScale: Float? = nil) throws -> [CGImage] {
    let pipeline = try readJSON(folder.appendingPathComponent("pipeline.json"))
    let sidecar = try JSONDecoder().decode(Sidecar.self, from: Data(contentsOf: folder.appendingPathComponent("sampler.coreml.json")))
    let specs = Dictionary(uniqueKeysWithValues: sidecar.inputs.map { ($0.name, $0) })
    let encoders = try (pipeline["text_encoders"] as! [[String: Any]]).map { try TextEncoder(folder: folder, pipeline: pipeline, entry: $0) }

    var features = try encode(prompt, encoders)
    if specs["negative_encoder_hidden_states"] != nil {  // classifier-free guidance: the negative prompt's condition
        let guidance = pipeline["guidance"] as! [String: Any]
        var negative = try encode(negativePrompt ?? "", encoders)
        if negativePrompt == nil, guidance["zeros_for_empty_negative_prompt"] as? Bool == true {  // SDXL
            negative = negative.mapValues { MLShapedArray<Float>(repeating: 0, shape: $0.shape) }
        }
        for (name, value) in negative { features["negative_" + name] = value }
        let scale = guidanceScale ?? Float(guidance["default_scale"] as! Double)
        features["guidance_scale"] = MLShapedArray(scalars: [scale], shape: [1])
    }
    if let timeIds = specs["time_ids"] {  // SDXL: original size, crop (0, 0), target size, per sample
        let size = (pipeline["image"] as! [String: Any])["shape"] as! [Any]  // [batch, 3, H, W]
        let (height, width) = (Float(size[2] as! Int), Float(size[3] as! Int))
        let row: [Float] = [height, width, 0, 0, height, width]
        features["time_ids"] = MLShapedArray(scalars: Array(repeating: row, count: timeIds.shape[0]).flatMap { $0 }, shape: timeIds.shape)
    }
    let noiseShape = specs["noise"]!.shape  // [batch, latent channels, h, w], standard normal
    features["noise"] = MLShapedArray(scalars: standardNormal(count: noiseShape.reduce(1, *), seed: seed), shape: noiseShape)

    let inputs = features.filter { specs[$0.key] != nil }.mapValues { MLFeatureValue(multiArray: MLMultiArray($0)) }
    let output = try loadModel(folder, "sampler").prediction(from: MLDictionaryFeatureProvider(dictionary: inputs))
    let image = MLShapedArray<Float>(converting: output.featureValue(for: sidecar.outputs[0].name)!.multiArrayValue!)
    return cgImages(image)  // "image": [B, 3, H, W] RGB in [0, 1]
}

func cgImages(_ image: MLShapedArray<Float>) -> [CGImage] {
    let (batch, height, width) = (image.shape[0], image.shape[2], image.shape[3])
    let values = image.scalars, plane = height * width
    return (0..<batch).map { n in
        var rgba = [UInt8](repeating: 255, count: plane * 4)
        for c in 0..<3 {
            for p in 0..<plane { rgba[p * 4 + c] = UInt8((min(max(values[(n * 3 + c) * plane + p], 0), 1) * 255).rounded()) }
        }
        return CGImage(width: width, height: height, bitsPerComponent: 8, bitsPerPixel: 32, bytesPerRow: width * 4,
                       space: CGColorSpace(name: CGColorSpace.sRGB)!, bitmapInfo: CGBitmapInfo(rawValue: CGImageAlphaInfo.noneSkipLast.rawValue),
                       provider: CGDataProvider(data: Data(rgba) as CFData)!, decode: nil, shouldInterpolate: false, intent: .defaultIntent)!
    }
}

func writePNG(_ image: CGImage, to url: URL) -> Bool {
    guard let destination = CGImageDestinationCreateWithURL(url as CFURL, UTType.png.identifier as CFString, 1, nil) else { return false }
    CGImageDestinationAddImage(destination, image, nil)
    return CGImageDestinationFinalize(destination)
}

// Example: let images = try generateImages(folder: exportFolder, prompt: "a handwritten seven", negativePrompt: "blurry")
//          _ = writePNG(images[0], to: URL(fileURLWithPath: "seven.png"))
