// Fixes Ferry applies to the ggml sources it extracts from node-llama-cpp's bundle (never to a
// FERRY_GGML_DIR checkout, which is the user's). Each is an exact text replacement that must match
// once; a ggml upgrade that changes the text fails the build here, so the fix is looked at again
// (dropped if upstream fixed it). Found by scripts/fuzz.sh (see native/fuzz/findings/).
export const GGML_FIXES = [
  {
    file: "src/gguf.cpp",
    why:
      "gguf_init: a tensor's element count was computed (a signed product that can overflow) " +
      "before the check that it is representable; a product wrapping to <= 0 skipped the check",
    find: "            // check that the total number of elements is representable\n            // (a zero-element tensor is trivially representable; the guard also avoids a division by zero below)\n            if (ok && ggml_nelements(&info.t) > 0 &&\n                ((INT64_MAX/info.t.ne[1] <= info.t.ne[0]) ||\n                 (INT64_MAX/info.t.ne[2] <= info.t.ne[0]*info.t.ne[1]) ||\n                 (INT64_MAX/info.t.ne[3] <= info.t.ne[0]*info.t.ne[1]*info.t.ne[2]))) {\n",
    replace:
      "            // check that the total number of elements is representable\n            // (a zero-element tensor is trivially representable). Ferry: the product is built one\n            // dimension at a time, each step checked before it is taken; upstream computed\n            // ggml_nelements() first, a signed overflow that could wrap to <= 0 and skip the check.\n            bool representable = true;\n            if (ok && info.t.ne[0] != 0 && info.t.ne[1] != 0 && info.t.ne[2] != 0 && info.t.ne[3] != 0) {\n                int64_t product = 1;\n                for (uint32_t j = 0; j < GGML_MAX_DIMS; ++j) {\n                    if (product >= INT64_MAX / info.t.ne[j]) {\n                        representable = false;\n                        break;\n                    }\n                    product *= info.t.ne[j];\n                }\n            }\n            if (ok && !representable) {\n",
  },
];
