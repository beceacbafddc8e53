/* Native Merkle hashing for differ/leafhash.py: blake3 of many 4 KiB leaves per call, SIMD across
 * leaves, and the keyed interior nodes of a level.
 *
 * Why: a Python call per 4 KiB leaf costs ~3.5x what blake3 costs over the same bytes in one call,
 * and blake3's own SIMD only helps inside one input (a 4 KiB leaf is 4 chunks: a quarter of an
 * AVX-512 lane set). Here the chunk compressions of 16 (AVX-512) leaves run side by side through
 * blake3's `blake3_hash_many`, as one-call blake3 does for the chunks of one long input, so the
 * leaves hash at one-call speed. The digests are exactly blake3's: a 4 KiB leaf is the 4-chunk
 * tree parent(parent(c0, c1), parent(c2, c3)) with ROOT on the top parent, each chunk numbered by
 * its position in its own leaf.
 *
 * Built at install time by `python -m differ.leafhash --build` (scripts/setup-host.sh) with gcc
 * against the blake3 C sources of Debian's librust-blake3-dev package; nothing of blake3 is kept in
 * this repository. Loaded through ctypes, which releases the GIL for the length of each call.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "blake3.h"
#include "blake3_impl.h"

#define RM_EXPORT __attribute__((visibility("default")))

#ifndef RM_SOURCE_DIGEST
#define RM_SOURCE_DIGEST "unknown"
#endif
#ifndef RM_SHIM_DIGEST
#define RM_SHIM_DIGEST "unknown"
#endif

enum {
  LEAF = 4096,
  CHUNKS = LEAF / BLAKE3_CHUNK_LEN,           /* 4 */
  CHUNK_BLOCKS = BLAKE3_CHUNK_LEN / BLAKE3_BLOCK_LEN, /* 16 */
  BATCH = 64,                                 /* leaves per round: 4 x 16 AVX-512 lanes, ~10 KiB of state */
};

_Static_assert(CHUNKS == 4, "the leaf tree below is written for 4 chunks per leaf");

/* The ABI the Python side checks before it calls anything else. */
RM_EXPORT int rm_abi(void) { return 1; }

/* A digest of this file, the blake3 sources and the flags it was built from (set by the build):
 * the build skips a library whose inputs did not change. The build finds it in the file's bytes
 * after its tag, without loading the library (a process cannot load a rebuilt library again
 * under the same path: dlopen hands back the one it has). */
static const char build_stamp[] = "rm-leafhash-build:" RM_SOURCE_DIGEST;
RM_EXPORT const char *rm_source_digest(void) { return build_stamp + sizeof "rm-leafhash-build:" - 1; }

/* A digest of this file alone (set by the build): the loader refuses a library built from another. */
RM_EXPORT const char *rm_shim_digest(void) { return RM_SHIM_DIGEST; }

/* Inputs blake3 hashes side by side on this CPU (1 = portable code only). */
RM_EXPORT size_t rm_simd_degree(void) { return blake3_simd_degree(); }

static void hash_one(const uint8_t *data, size_t len, const uint8_t *key, uint8_t out[BLAKE3_OUT_LEN]) {
  blake3_hasher h;
  if (key != NULL) {
    blake3_hasher_init_keyed(&h, key);
  } else {
    blake3_hasher_init(&h);
  }
  blake3_hasher_update(&h, data, len);
  blake3_hasher_finalize(&h, out, BLAKE3_OUT_LEN);
}

/* out[32 * i] = blake3(leaf i of data) for every leaf of 4096 bytes; the last leaf may be short. */
RM_EXPORT void rm_hash_leaves(const uint8_t *data, size_t len, uint8_t *out) {
  const uint8_t *inputs[2 * BATCH];
  uint8_t cvs[CHUNKS][BATCH * BLAKE3_OUT_LEN];
  uint8_t parents[BATCH * 2 * BLAKE3_BLOCK_LEN]; /* per leaf: cv0 cv1 | cv2 cv3 */
  uint8_t tops[BATCH * BLAKE3_BLOCK_LEN];        /* per leaf: p01 p23 */
  size_t full = len / LEAF;
  for (size_t first = 0; first < full; first += BATCH) {
    size_t n = full - first < BATCH ? full - first : BATCH;
    const uint8_t *base = data + first * LEAF;
    for (size_t c = 0; c < CHUNKS; c++) {
      for (size_t i = 0; i < n; i++) {
        inputs[i] = base + i * LEAF + c * BLAKE3_CHUNK_LEN;
      }
      blake3_hash_many(inputs, n, CHUNK_BLOCKS, IV, c, false, 0, CHUNK_START, CHUNK_END, cvs[c]);
    }
    for (size_t i = 0; i < n; i++) {
      uint8_t *p = parents + i * 2 * BLAKE3_BLOCK_LEN;
      for (size_t c = 0; c < CHUNKS; c++) {
        memcpy(p + c * BLAKE3_OUT_LEN, cvs[c] + i * BLAKE3_OUT_LEN, BLAKE3_OUT_LEN);
      }
    }
    for (size_t j = 0; j < 2 * n; j++) {
      inputs[j] = parents + j * BLAKE3_BLOCK_LEN;
    }
    blake3_hash_many(inputs, 2 * n, 1, IV, 0, false, PARENT, 0, 0, tops);
    for (size_t i = 0; i < n; i++) {
      inputs[i] = tops + i * BLAKE3_BLOCK_LEN;
    }
    blake3_hash_many(inputs, n, 1, IV, 0, false, PARENT | ROOT, 0, 0, out + first * BLAKE3_OUT_LEN);
  }
  if (len % LEAF) {
    hash_one(data + full * LEAF, len % LEAF, NULL, out + full * BLAKE3_OUT_LEN);
  }
}

/* out[32 * j] = blake3(data[j * group : (j + 1) * group], key) for every group (the last may be
 * short): one interior level of the tree over the level below it. */
RM_EXPORT void rm_hash_nodes(const uint8_t *data, size_t len, size_t group, const uint8_t key[BLAKE3_KEY_LEN],
                             uint8_t *out) {
  if (group == 0) {
    return;
  }
  size_t full = len / group;
  if (group % BLAKE3_BLOCK_LEN == 0 && group <= BLAKE3_CHUNK_LEN) {
    /* a node of at most one chunk: one chunk's compressions, several nodes side by side */
    uint32_t key_words[8];
    for (size_t w = 0; w < 8; w++) {
      key_words[w] = (uint32_t)key[4 * w] | (uint32_t)key[4 * w + 1] << 8 | (uint32_t)key[4 * w + 2] << 16 |
                     (uint32_t)key[4 * w + 3] << 24;
    }
    const uint8_t *inputs[BATCH];
    for (size_t first = 0; first < full; first += BATCH) {
      size_t n = full - first < BATCH ? full - first : BATCH;
      for (size_t i = 0; i < n; i++) {
        inputs[i] = data + (first + i) * group;
      }
      blake3_hash_many(inputs, n, group / BLAKE3_BLOCK_LEN, key_words, 0, false, KEYED_HASH, CHUNK_START,
                       CHUNK_END | ROOT, out + first * BLAKE3_OUT_LEN);
    }
  } else {
    for (size_t j = 0; j < full; j++) {
      hash_one(data + j * group, group, key, out + j * BLAKE3_OUT_LEN);
    }
  }
  if (len % group) {
    hash_one(data + full * group, len % group, key, out + full * BLAKE3_OUT_LEN);
  }
}
