// herald.js's size as shipped, minified (esbuild) and minified + gzipped (zlib, level 9).
// `npm run size` prints it; size.test.js holds it to a budget; the README quotes it.

import { readFileSync } from "node:fs";
import path from "node:path";
import { gzipSync } from "node:zlib";
import { transform } from "esbuild";
import { CLIENT_DIR } from "./helpers.js";

export async function sizes() {
  const source = readFileSync(path.join(CLIENT_DIR, "herald.js"), "utf8");
  const { code } = await transform(source, { minify: true, format: "esm", target: "es2022" });
  return {
    source: Buffer.byteLength(source),
    gzipped: gzipSync(source, { level: 9 }).length,
    minified: Buffer.byteLength(code),
    minifiedGzipped: gzipSync(code, { level: 9 }).length,
  };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const s = await sizes();
  console.log(`herald.js: ${s.source} bytes (${s.gzipped} gzipped); minified ${s.minified} bytes, ${s.minifiedGzipped} gzipped`);
}
