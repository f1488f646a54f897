// Runs a wasm32-wasip1 command module in Node's V8 through WASI:
//   node --no-warnings run.mjs MODULE DIR ARG...   (DIR is made visible to the module as itself)
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';
const [module, dir, ...args] = process.argv.slice(2);
const wasi = new WASI({ version: 'preview1', args: [module, ...args], preopens: { [dir]: dir } });
const compiled = await WebAssembly.compile(await readFile(module));
const instance = await WebAssembly.instantiate(compiled, wasi.getImportObject());
process.exitCode = wasi.start(instance);
