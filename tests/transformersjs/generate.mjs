// node generate.mjs DIR PROMPT MAX_NEW_TOKENS
// Loads DIR (python -m runtimes export --onnx) from disk only and generates greedily with the
// text-generation pipeline; prints JSON {ids: prompt and new token ids, text: the pipeline's text}.
import path from 'node:path';
import { env, pipeline } from '@huggingface/transformers';

const [dir, prompt, maxNew] = process.argv.slice(2);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(dir));
const name = path.basename(path.resolve(dir));

const generator = await pipeline('text-generation', name, { dtype: 'fp32', device: 'cpu' });
const options = { do_sample: false, max_new_tokens: Number(maxNew) };
const [{ generated_text: text }] = await generator(prompt, options);
// the pipeline returns text only: the same greedy call on its model gives the ids
const inputs = generator.tokenizer(prompt);
const ids = await generator.model.generate({ ...inputs, ...options });
process.stdout.write(JSON.stringify({ ids: Array.from(ids.tolist()[0], Number), text }) + '\n');
