// Load an exported sam-split ONNX folder (SAM, SAM 2 or the SAM 3 tracker) from disk with transformers.js (remote
// models disabled) and segment, as an app would.
//   node segment.mjs MODEL_FOLDER INPUTS.json OUTPUTS.json
// INPUTS.json: {"pixel_values": TENSOR, "prompts": {NAME: {"input_points": TENSOR, ...}}}, a TENSOR being
// {"type": "float32" | "int64", "dims": [...], "data": [...]}; a prompt holds only what the app gives (transformers.js
// fills in what the decoder graph needs besides). OUTPUTS.json: {"embeddings": {NAME: TENSOR}, NAME: {"iou_scores":
// TENSOR, "pred_masks": TENSOR[, "object_score_logits": TENSOR]}}.
import fs from 'node:fs';
import path from 'node:path';
import { Sam2Model, Sam3TrackerModel, SamModel, Tensor, env } from '@huggingface/transformers';

const [folder, inputsPath, outputsPath] = process.argv.slice(2);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(folder)) + path.sep;

const toTensor = ({ type, dims, data }) =>
    new Tensor(type, type === 'int64' ? BigInt64Array.from(data, BigInt) : Float32Array.from(data), dims);
const fromTensor = (tensor) => ({ type: tensor.type, dims: tensor.dims, data: Array.from(tensor.data, Number) });
const fromTensors = (tensors) =>
    Object.fromEntries(Object.entries(tensors).filter(([, value]) => value instanceof Tensor)
        .map(([name, value]) => [name, fromTensor(value)]));

const { model_type } = JSON.parse(fs.readFileSync(path.join(folder, 'config.json'), 'utf8'));
const ModelClass = { sam: SamModel, sam2: Sam2Model, sam3_tracker: Sam3TrackerModel }[model_type];
const model = await ModelClass.from_pretrained(path.basename(path.resolve(folder)), { dtype: 'fp32', device: 'cpu' });
const inputs = JSON.parse(fs.readFileSync(inputsPath, 'utf8'));
// The image is encoded once; every prompt is decoded against that embedding.
const embeddings = await model.get_image_embeddings({ pixel_values: toTensor(inputs.pixel_values) });
const outputs = { embeddings: fromTensors(embeddings) };
for (const [name, prompt] of Object.entries(inputs.prompts)) {
    const prompts = Object.fromEntries(Object.entries(prompt).map(([key, value]) => [key, toTensor(value)]));
    outputs[name] = fromTensors(await model({ ...embeddings, ...prompts }));
}
fs.writeFileSync(outputsPath, JSON.stringify(outputs));
