// sam-split's click-to-segment page: transformers.js runs an exported SAM-family model in the browser (onnxruntime-web,
// wasm, one thread), from files next to this one; nothing is fetched from a CDN. page-config.json (written by
// export_onnx.py --page or push.py --space) says where the model is:
//   {"model": "."}                                                   the folder this page is in
//   {"model": "ORG/NAME", "revision": "SHA", "remote_host": "https://huggingface.co/"}   a Hub repo, pinned
// For scripts and tests: window.ready (resolves once the model is loaded), await window.loadImage(url),
// await window.segment({points: [[x, y], ...], labels: [1, 0, ...], box: [x0, y0, x1, y1] or null}) ->
// {width, height, mask: Uint8Array (1 = object, row-major, the image's size), score: the highest predicted IoU}.
import { AutoConfig, AutoProcessor, RawImage, Sam2Model, SamModel, Tensor, env } from './vendor/transformers.min.js';

// Per family member (config.json's model_type): the transformers.js model class, and the decoder inputs that a prompt
// leaves out and the class does not fill in itself. Another member (the SAM 3 tracker: Sam3TrackerModel) is one entry.
const SAM = { modelClass: SamModel, complete: completeSamPrompt };
const SAM2 = { modelClass: Sam2Model, complete: (inputs) => inputs }; // Sam2Model fills in what is missing
// An exported folder says "sam" / "sam2"; a repo published by push.py --onnx keeps its twin's config.json.
const MEMBERS = { sam: SAM, sam_split: SAM, sam2: SAM2, sam2_split: SAM2 };

// sam-split's SAM decoder graph takes every input: no points are zero of them, no box is -1s (see the model card).
function completeSamPrompt(inputs) {
    const completed = { ...inputs };
    if (!completed.input_points) {
        completed.input_points = new Tensor('float32', new Float32Array(0), [1, 1, 0, 2]);
        completed.input_labels = new Tensor('int64', new BigInt64Array(0), [1, 1, 0]);
    }
    completed.input_boxes ??= new Tensor('float32', Float32Array.of(-1, -1, -1, -1), [1, 1, 4]);
    return completed;
}

const canvas = document.getElementById('canvas');
const context = canvas.getContext('2d');
const statusLine = document.getElementById('status');
const downloadButton = document.getElementById('download');
const state = { model: null, processor: null, image: null, encoded: null, points: [], labels: [], box: null };

async function loadModel() {
    const config = await (await fetch('page-config.json')).json();
    const local = config.model === '.';
    env.allowLocalModels = local;
    env.allowRemoteModels = !local;
    env.useBrowserCache = !local; // a pinned Hub revision never changes; a local folder may be exported again
    if (!local) {
        env.remoteHost = config.remote_host;
        env.remotePathTemplate = '{model}/resolve/{revision}/';
    }
    const here = (name) => new URL(`vendor/${name}`, window.location.href).href;
    env.backends.onnx.wasm.wasmPaths = {
        mjs: here('ort-wasm-simd-threaded.asyncify.mjs'),
        wasm: here('ort-wasm-simd-threaded.asyncify.wasm'),
    };
    env.backends.onnx.wasm.numThreads = 1; // threads need cross-origin isolation (COOP/COEP), which a static host lacks
    const options = config.revision ? { revision: config.revision } : {};
    const modelConfig = await AutoConfig.from_pretrained(config.model, options);
    const member = MEMBERS[modelConfig.model_type];
    if (!member) {
        throw new Error(`model_type ${modelConfig.model_type} is not one this page runs (${Object.keys(MEMBERS)})`);
    }
    state.member = member;
    state.model = await member.modelClass.from_pretrained(config.model, { ...options, dtype: 'fp32', device: 'wasm' });
    state.processor = await AutoProcessor.from_pretrained(config.model, options);
    document.getElementById('model').textContent = local ? 'Model: this folder.'
        : `Model: ${config.model} at revision ${config.revision}.`;
    statusLine.textContent = 'Ready: open an image.';
}

async function loadImage(url) {
    await window.ready;
    statusLine.textContent = 'Encoding the image...';
    const image = await RawImage.fromURL(url);
    const inputs = await state.processor(image);
    state.encoded = {
        embeddings: await state.model.get_image_embeddings(inputs),
        original_sizes: inputs.original_sizes,
        reshaped_input_sizes: inputs.reshaped_input_sizes,
    };
    state.image = image;
    state.pixels = new ImageData(new Uint8ClampedArray(image.clone().rgba().data), image.width, image.height);
    state.points = [];
    state.labels = [];
    state.box = null;
    state.result = null;
    canvas.width = image.width;
    canvas.height = image.height;
    draw();
    downloadButton.disabled = true;
    statusLine.textContent = `Image ${image.width}x${image.height}: click or drag.`;
}

async function segment({ points = [], labels = [], box = null } = {}) {
    if (!state.encoded) throw new Error('no image: call loadImage(url) first');
    if (!points.length && !box) throw new Error('give points or a box');
    if (points.length !== labels.length) throw new Error('points and labels differ in length');
    const { embeddings, original_sizes, reshaped_input_sizes } = state.encoded;
    const imageProcessor = state.processor.image_processor;
    const prompt = {};
    if (points.length) {
        prompt.input_points = imageProcessor.reshape_input_points([points], original_sizes, reshaped_input_sizes);
        prompt.input_labels = imageProcessor.add_input_labels([labels], prompt.input_points);
    }
    if (box) {
        prompt.input_boxes = imageProcessor.reshape_input_points([[box]], original_sizes, reshaped_input_sizes, true);
    }
    const outputs = await state.model({ ...embeddings, ...state.member.complete(prompt) });
    const [masks] = await state.processor.post_process_masks(outputs.pred_masks, original_sizes, reshaped_input_sizes);
    const scores = Array.from(outputs.iou_scores.data); // (1, 1, masks): one image, one prompt
    const best = scores.indexOf(Math.max(...scores));
    const [height, width] = masks.dims.slice(-2);
    const mask = Uint8Array.from(masks.data.subarray(best * height * width, (best + 1) * height * width));
    return { width, height, mask, score: scores[best] };
}

function draw() {
    if (!state.image) return;
    context.putImageData(state.pixels, 0, 0);
    if (state.result) {
        const { width, height, mask } = state.result;
        const overlay = context.getImageData(0, 0, width, height);
        for (let i = 0; i < mask.length; ++i) {
            if (mask[i]) { // tint the object blue
                overlay.data[4 * i] = overlay.data[4 * i] * 0.45;
                overlay.data[4 * i + 1] = overlay.data[4 * i + 1] * 0.45 + 0.55 * 120;
                overlay.data[4 * i + 2] = overlay.data[4 * i + 2] * 0.45 + 0.55 * 255;
            }
        }
        context.putImageData(overlay, 0, 0);
    }
    const radius = Math.max(1.5, canvas.width / 100);
    state.points.forEach(([x, y], i) => {
        context.beginPath();
        context.arc(x, y, radius, 0, 2 * Math.PI);
        context.fillStyle = state.labels[i] ? '#2e7d32' : '#c62828';
        context.fill();
    });
    if (state.box) {
        const [x0, y0, x1, y1] = state.box;
        context.strokeStyle = '#ffb300';
        context.lineWidth = Math.max(1, canvas.width / 256);
        context.strokeRect(x0, y0, x1 - x0, y1 - y0);
    }
}

// Image coordinates (pixels of the image, fractional) of a mouse event on the canvas, whatever its displayed size.
function imagePoint(event) {
    const rect = canvas.getBoundingClientRect();
    return [(event.clientX - rect.left) * canvas.width / rect.width,
            (event.clientY - rect.top) * canvas.height / rect.height];
}

async function segmentPrompts() {
    statusLine.textContent = 'Segmenting...';
    const started = performance.now();
    state.result = await segment({ points: state.points, labels: state.labels, box: state.box });
    window.lastResult = { ...state.result, points: state.points.slice(), labels: state.labels.slice(), box: state.box };
    draw();
    downloadButton.disabled = false;
    statusLine.textContent = `Mask score (predicted IoU) ${state.result.score.toFixed(3)}, ` +
        `${Math.round(performance.now() - started)} ms.`;
}

let pressed = null;
canvas.addEventListener('contextmenu', (event) => event.preventDefault());
canvas.addEventListener('pointerdown', (event) => { pressed = { at: imagePoint(event), event }; });
canvas.addEventListener('pointerup', (event) => {
    if (!pressed || !state.encoded) return;
    const [x0, y0] = pressed.at;
    const [x1, y1] = imagePoint(event);
    const dragged = Math.hypot(event.clientX - pressed.event.clientX, event.clientY - pressed.event.clientY) > 5;
    if (dragged) {
        state.box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
    } else {
        state.points.push([x0, y0]);
        state.labels.push(pressed.event.button === 2 || pressed.event.shiftKey ? 0 : 1);
    }
    pressed = null;
    window.pending = segmentPrompts().catch((error) => { statusLine.textContent = `Error: ${error.message}`; });
});

document.getElementById('clear').addEventListener('click', () => {
    Object.assign(state, { points: [], labels: [], box: null, result: null });
    downloadButton.disabled = true;
    draw();
});

document.getElementById('file').addEventListener('change', (event) => {
    const [file] = event.target.files;
    if (file) loadImage(URL.createObjectURL(file));
});

// The mask as a black-and-white PNG at the image's size (white = object).
downloadButton.addEventListener('click', () => {
    const { width, height, mask } = state.result;
    const pixels = new ImageData(width, height);
    mask.forEach((value, i) => { pixels.data.fill(value ? 255 : 0, 4 * i, 4 * i + 3); pixels.data[4 * i + 3] = 255; });
    const out = document.createElement('canvas');
    Object.assign(out, { width, height });
    out.getContext('2d').putImageData(pixels, 0, 0);
    const link = document.createElement('a');
    link.download = 'mask.png';
    link.href = out.toDataURL('image/png');
    link.click();
});

window.loadImage = loadImage;
window.segment = segment;
window.ready = loadModel();
window.ready.catch((error) => { statusLine.textContent = `Error: ${error.message}`; });
