// herald.js stays small: a budget on its minified, gzipped size (the README gives the figure).

import { test } from "node:test";
import assert from "node:assert/strict";
import { sizes } from "./size.js";

test("herald.js minified and gzipped stays under 6 KiB", async (t) => {
  const s = await sizes();
  t.diagnostic(`source ${s.source} B, minified ${s.minified} B, minified+gzip ${s.minifiedGzipped} B`);
  assert.ok(s.minifiedGzipped < 6 * 1024, JSON.stringify(s));
});
