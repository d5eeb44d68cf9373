// Load an exported sam-split ONNX folder from disk with transformers.js (remote models disabled) and segment.
//   node segment.mjs MODEL_FOLDER INPUTS.json OUTPUTS.json
// INPUTS.json: {"pixel_values": TENSOR, "prompts": {NAME: {"input_points": TENSOR, ...}}}, a TENSOR being
// {"type": "float32" | "int64", "dims": [...], "data": [...]}. OUTPUTS.json: {NAME: {"iou_scores": TENSOR,
// "pred_masks": TENSOR}}, and the image embeddings under "image_embeddings".
import fs from 'node:fs';
import path from 'node:path';
import { SamModel, Tensor, env } from '@huggingface/transformers';

const [folder, inputsPath, outputsPath] = process.argv.slice(2);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(folder)) + path.sep;

const toTensor = ({ type, dims, data }) =>
    new Tensor(type, type === 'int64' ? BigInt64Array.from(data, BigInt) : Float32Array.from(data), dims);
const fromTensor = (tensor) => ({ type: tensor.type, dims: tensor.dims, data: Array.from(tensor.data, Number) });

const model = await SamModel.from_pretrained(path.basename(path.resolve(folder)), { dtype: 'fp32', device: 'cpu' });
const inputs = JSON.parse(fs.readFileSync(inputsPath, 'utf8'));
// The image is encoded once; every prompt is decoded against that embedding, as an app would.
const embeddings = await model.get_image_embeddings({ pixel_values: toTensor(inputs.pixel_values) });
const outputs = { image_embeddings: fromTensor(embeddings.image_embeddings) };
for (const [name, prompt] of Object.entries(inputs.prompts)) {
    const prompts = Object.fromEntries(Object.entries(prompt).map(([key, value]) => [key, toTensor(value)]));
    const result = await model({ ...embeddings, ...prompts });
    outputs[name] = { iou_scores: fromTensor(result.iou_scores), pred_masks: fromTensor(result.pred_masks) };
}
fs.writeFileSync(outputsPath, JSON.stringify(outputs));
