/*
 * prefill_decode.c: hand one request's KV cache from a prefill server to a decode server
 * through the kvtransfer C ABI.
 *
 * Build and run (from the repository root, after `cargo build --release`):
 *
 *   cc -Iinclude examples/c/prefill_decode.c -Ltarget/release -lkvtransfer \
 *      -Wl,-rpath,$PWD/target/release -o prefill_decode
 *   ./prefill_decode
 *
 * Both servers live in this one process here, talking over TCP loopback; in production each
 * side runs the same calls in its own process and the decode side learns the prefill side's
 * bootstrap address from the router. The model is DeepSeek-V3-shaped: 61 layers of MLA KV
 * cache (one buffer per layer) in pages of 36 KiB, and the request covers 256 pages. Each
 * side owns a pool of 300 pages per layer, and the request's pages sit at scattered, partly
 * contiguous places in each pool, as they do in a real paged KV cache.
 *
 * The hand-off is a "room" (SGLang's bootstrap_room), polled through KVPoll states:
 *   decode:  receiver = create(prefill address, room); init(destination pages, aux slot)
 *   prefill: sender = create(room); init(page count, aux slot); wait for WAITING_FOR_INPUT;
 *            send(pages) in chunks as prefill produces them, the last one with is_last
 *   both:    poll until KVT_POLL_SUCCESS (or KVT_POLL_FAILED: then ask for the reason)
 */
#define _POSIX_C_SOURCE 200809L

#include "kvtransfer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum {
    LAYERS = 61,           /* one MLA buffer per layer */
    POOL_PAGES = 300,      /* pages each side's pool holds per layer */
    ROOM_PAGES = 256,      /* pages of this request */
    PAGE_BYTES = 36 << 10, /* one page of one layer */
    CHUNKS = 4,            /* prefill sends the request in 4 chunks of 64 pages */
    AUX_SLOTS = 64,        /* aux buffer: one small slot per running request */
    AUX_BYTES = 4096,
};
static const uint64_t ROOM = 42;       /* both sides name the request by this id */
static const int64_t PREFILL_AUX = 5;  /* the request's aux slot on the prefill side... */
static const int64_t DECODE_AUX = 9;   /* ...and where it goes on the decode side */
static const double TIMEOUT_S = 60.0;

/* Any failing call ends the program with the library's message for this thread. */
#define CHECK(call)                                                                          \
    do {                                                                                     \
        int32_t rc_ = (call);                                                                \
        if (rc_ != KVT_OK) {                                                                 \
            fprintf(stderr, "%s:%d: %s failed with %d: %s\n", __FILE__, __LINE__, #call, rc_, \
                    kvt_last_error_message());                                               \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *alloc_zeroed(size_t bytes) {
    /* Page-aligned, as RDMA registration prefers; kvtransfer accepts any host memory. */
    void *p = aligned_alloc(4096, bytes);
    if (p == NULL) {
        fprintf(stderr, "out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    memset(p, 0, bytes);
    return p;
}

/* The bytes the prefill side computes for (layer, pool page): a word pattern that differs
 * for every layer, page and offset, so a page landing in the wrong place is caught. */
static uint64_t pattern(int layer, int page, size_t word) {
    uint64_t x = ((uint64_t)layer << 48) ^ ((uint64_t)page << 32) ^ (uint64_t)word;
    return x * 0x9E3779B97F4A7C15ull + 1;
}

/* A deterministic generator, so runs are reproducible. */
static uint32_t next_random(uint64_t *state) {
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*state >> 33);
}

/* Picks ROOM_PAGES distinct pages out of the POOL_PAGES of a pool the way a paged allocator
 * leaves them: runs of 1..8 contiguous pages with gaps, the runs in shuffled order. */
static void pick_pages(int32_t pages[ROOM_PAGES], uint64_t seed) {
    int run_start[ROOM_PAGES], run_len[ROOM_PAGES], runs = 0, taken = 0, next = 0;
    int spare = POOL_PAGES - ROOM_PAGES; /* how many pool pages may be skipped in all */
    while (taken < ROOM_PAGES) {
        int gap = spare > 0 ? (int)(next_random(&seed) % 3) : 0;
        if (gap > spare) gap = spare;
        spare -= gap;
        next += gap;
        int len = 1 + (int)(next_random(&seed) % 8);
        if (len > ROOM_PAGES - taken) len = ROOM_PAGES - taken;
        run_start[runs] = next;
        run_len[runs] = len;
        runs++;
        next += len;
        taken += len;
    }
    for (int i = runs - 1; i > 0; i--) { /* Fisher-Yates over the runs */
        int j = (int)(next_random(&seed) % (uint32_t)(i + 1));
        int s = run_start[i], l = run_len[i];
        run_start[i] = run_start[j];
        run_len[i] = run_len[j];
        run_start[j] = s;
        run_len[j] = l;
    }
    int k = 0;
    for (int r = 0; r < runs; r++)
        for (int i = 0; i < run_len[r]; i++) pages[k++] = run_start[r] + i;
}

/* One side's KV cache: a pool buffer per layer plus one aux buffer. */
struct kv_cache {
    uint8_t *layer[LAYERS];
    uint8_t *aux;
    kvt_kv_buffer buffers[LAYERS];
    kvt_kv_buffer aux_buffer;
};

static void kv_cache_alloc(struct kv_cache *c) {
    const size_t layer_bytes = (size_t)POOL_PAGES * PAGE_BYTES;
    for (int l = 0; l < LAYERS; l++) {
        c->layer[l] = alloc_zeroed(layer_bytes);
        c->buffers[l].addr = (uint64_t)(uintptr_t)c->layer[l];
        c->buffers[l].len = layer_bytes;
        c->buffers[l].item_len = PAGE_BYTES;
    }
    c->aux = alloc_zeroed((size_t)AUX_SLOTS * AUX_BYTES);
    c->aux_buffer.addr = (uint64_t)(uintptr_t)c->aux;
    c->aux_buffer.len = (uint64_t)AUX_SLOTS * AUX_BYTES;
    c->aux_buffer.item_len = AUX_BYTES;
}

static void kv_cache_free(struct kv_cache *c) {
    for (int l = 0; l < LAYERS; l++) free(c->layer[l]);
    free(c->aux);
}

/* A KV manager for one role over `cache`. The manager starts its own engine (TCP on
 * loopback here; leave `transport` 0 to let it use RDMA where both ends have it) and
 * registers every buffer; the memory must outlive the manager and its rooms. */
static kvt_kv_manager *start_manager(uint32_t role, struct kv_cache *cache) {
    kvt_engine_config engine;
    memset(&engine, 0, sizeof engine); /* zero fields mean "default" */
    engine.struct_size = sizeof engine;
    engine.listen = "127.0.0.1:0"; /* port 0: any free port; ask bootstrap_addr for it */
    engine.transport = KVT_TRANSPORT_TCP;

    kvt_kv_config kv;
    memset(&kv, 0, sizeof kv);
    kv.struct_size = sizeof kv;
    kv.role = role;
    kv.buffers = cache->buffers;
    kv.num_buffers = LAYERS;
    kv.aux = &cache->aux_buffer;
    kv.num_aux = 1;

    kvt_kv_manager *m = NULL;
    CHECK(kvt_kv_manager_create(&engine, &kv, &m));
    return m;
}

/* Polls a room side until it reaches `want` (or beyond), failing on KVT_POLL_FAILED or
 * after the deadline. Polling never blocks; a real server polls once per scheduler step. */
typedef int32_t (*poll_fn)(const void *side, int32_t *state);
static int32_t sender_poll(const void *s, int32_t *state) { return kvt_kv_sender_poll(s, state); }
static int32_t receiver_poll(const void *r, int32_t *state) {
    return kvt_kv_receiver_poll(r, state);
}

static void wait_for(poll_fn poll, const void *side, const char *who, int32_t want,
                     double deadline) {
    for (;;) {
        int32_t state = KVT_POLL_BOOTSTRAPPING;
        CHECK(poll(side, &state));
        if (state == KVT_POLL_FAILED) {
            /* The poll succeeded; the room did not. The reason is in the message (and in
             * kvt_kv_*_failure_reason). */
            fprintf(stderr, "%s: room failed: %s\n", who, kvt_last_error_message());
            exit(1);
        }
        if (state >= want) return;
        if (now_s() > deadline) {
            fprintf(stderr, "%s: still in state %d after %.0f s\n", who, state, TIMEOUT_S);
            exit(1);
        }
    }
}

int main(void) {
    if (kvt_abi_version() != KVT_ABI_VERSION) {
        fprintf(stderr, "library ABI %u, header ABI %d\n", kvt_abi_version(), KVT_ABI_VERSION);
        return 1;
    }

    /* Both servers' KV caches. The prefill side's pages hold what prefill computed. */
    static struct kv_cache prefill_cache, decode_cache;
    kv_cache_alloc(&prefill_cache);
    kv_cache_alloc(&decode_cache);
    for (int l = 0; l < LAYERS; l++)
        for (int p = 0; p < POOL_PAGES; p++) {
            uint64_t *words = (uint64_t *)(prefill_cache.layer[l] + (size_t)p * PAGE_BYTES);
            for (size_t w = 0; w < PAGE_BYTES / 8; w++) words[w] = pattern(l, p, w);
        }
    for (int i = 0; i < AUX_BYTES; i++)
        prefill_cache.aux[PREFILL_AUX * AUX_BYTES + i] = (uint8_t)(i * 7 + 3);

    kvt_kv_manager *prefill = start_manager(KVT_ROLE_PREFILL, &prefill_cache);
    kvt_kv_manager *decode = start_manager(KVT_ROLE_DECODE, &decode_cache);
    char prefill_addr[64];
    CHECK(kvt_kv_manager_bootstrap_addr(prefill, prefill_addr, sizeof prefill_addr));
    printf("prefill manager at %s; %d layers x %d pages x %d KiB per request\n", prefill_addr,
           LAYERS, ROOM_PAGES, PAGE_BYTES >> 10);

    /* Where the request's pages are in each pool (their allocators chose independently). */
    int32_t src_pages[ROOM_PAGES], dst_pages[ROOM_PAGES];
    pick_pages(src_pages, 1);
    pick_pages(dst_pages, 2);

    /* Decode side: a receiver for the room, told where the pages and the aux slot go. */
    kvt_kv_receiver *receiver = NULL;
    CHECK(kvt_kv_receiver_create(decode, prefill_addr, ROOM, &receiver));
    CHECK(kvt_kv_receiver_init(receiver, dst_pages, ROOM_PAGES, DECODE_AUX));

    /* Prefill side: a sender for the same room. It can send once the receiver's destination
     * has arrived (KVT_POLL_WAITING_FOR_INPUT). */
    const double deadline = now_s() + TIMEOUT_S;
    kvt_kv_sender *sender = NULL;
    CHECK(kvt_kv_sender_create(prefill, ROOM, &sender));
    CHECK(kvt_kv_sender_init(sender, ROOM_PAGES, PREFILL_AUX));
    wait_for(sender_poll, sender, "sender", KVT_POLL_WAITING_FOR_INPUT, deadline);

    /* Send the pages in chunks, as chunked prefill finishes them. Chunk k's pages land in
     * the receiver's pages at the same positions of the room; the last chunk carries aux. */
    const double start = now_s();
    const int per_chunk = ROOM_PAGES / CHUNKS;
    for (int c = 0; c < CHUNKS; c++) {
        bool last = c == CHUNKS - 1;
        CHECK(kvt_kv_sender_send(sender, src_pages + c * per_chunk, (size_t)per_chunk, last));
    }
    /* Both sides see SUCCESS once every byte has landed. */
    wait_for(receiver_poll, receiver, "receiver", KVT_POLL_SUCCESS, deadline);
    const double elapsed = now_s() - start;
    wait_for(sender_poll, sender, "sender", KVT_POLL_SUCCESS, deadline);

    kvt_room_metrics metrics;
    memset(&metrics, 0, sizeof metrics);
    metrics.struct_size = sizeof metrics;
    CHECK(kvt_kv_sender_metrics(sender, &metrics));
    const double bytes = (double)LAYERS * ROOM_PAGES * PAGE_BYTES + AUX_BYTES;
    printf("room %llu: %.1f MiB in %llu writes, %.2f ms = %.2f GB/s (sender's transfer span "
           "%.2f ms)\n",
           (unsigned long long)ROOM, bytes / (1 << 20), (unsigned long long)metrics.slices,
           elapsed * 1e3, bytes / elapsed / 1e9, (double)metrics.transfer_span_ns / 1e6);
    if (metrics.bytes != (uint64_t)bytes) {
        fprintf(stderr, "sender metrics report %llu bytes, expected %.0f\n",
                (unsigned long long)metrics.bytes, bytes);
        return 1;
    }

    /* Done with the room: destroy both sides (before their managers). */
    CHECK(kvt_kv_sender_destroy(sender));
    CHECK(kvt_kv_receiver_destroy(receiver));

    /* Verify every byte: destination page dst_pages[i] of each layer holds source page
     * src_pages[i] of that layer, and pool pages outside the room are still zero. */
    uint64_t verified = 0;
    static int32_t room_page_of[POOL_PAGES];
    for (int p = 0; p < POOL_PAGES; p++) room_page_of[p] = -1;
    for (int i = 0; i < ROOM_PAGES; i++) room_page_of[dst_pages[i]] = i;
    for (int l = 0; l < LAYERS; l++)
        for (int p = 0; p < POOL_PAGES; p++) {
            const uint64_t *words = (const uint64_t *)(decode_cache.layer[l] + (size_t)p * PAGE_BYTES);
            int i = room_page_of[p];
            for (size_t w = 0; w < PAGE_BYTES / 8; w++) {
                uint64_t want = i < 0 ? 0 : pattern(l, src_pages[i], w);
                if (words[w] != want) {
                    fprintf(stderr, "layer %d page %d word %zu: %016llx, expected %016llx\n", l,
                            p, w, (unsigned long long)words[w], (unsigned long long)want);
                    return 1;
                }
            }
            if (i >= 0) verified += PAGE_BYTES;
        }
    if (memcmp(decode_cache.aux + DECODE_AUX * AUX_BYTES,
               prefill_cache.aux + PREFILL_AUX * AUX_BYTES, AUX_BYTES) != 0) {
        fprintf(stderr, "aux slot %lld differs from the prefill side's slot %lld\n",
                (long long)DECODE_AUX, (long long)PREFILL_AUX);
        return 1;
    }
    for (int s = 0; s < AUX_SLOTS; s++)
        for (int i = 0; i < AUX_BYTES && s != DECODE_AUX; i++)
            if (decode_cache.aux[s * AUX_BYTES + i] != 0) {
                fprintf(stderr, "aux slot %d was written\n", s);
                return 1;
            }
    verified += AUX_BYTES;
    printf("verified %llu bytes: %d pages x %d layers and the aux slot, byte for byte\n",
           (unsigned long long)verified, ROOM_PAGES, LAYERS);

    CHECK(kvt_kv_manager_destroy(prefill));
    CHECK(kvt_kv_manager_destroy(decode));
    kv_cache_free(&prefill_cache);
    kv_cache_free(&decode_cache);
    return 0;
}
