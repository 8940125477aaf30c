/*
 * Engine and batch part of the C ABI, driven from C: two engines in one process over TCP
 * loopback, caller-owned (malloc'd) memory, WRITE and READ batches (polled and waited),
 * address-based writes, and the error paths (NULL handles, unregistered memory, bad
 * struct_size, small buffers, unknown ids, a lost peer). Built and run by tests/c_abi.rs.
 */
#define _POSIX_C_SOURCE 200809L

#include "check.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MIB (1u << 20)


/* A call that must succeed and leave "" as the last error message. */
#define OK(call)                                                                              \
    do {                                                                                      \
        int32_t rc_ = (call);                                                                 \
        if (rc_ != KVT_OK)                                                                    \
            fail(__FILE__, __LINE__, "%s returned %d: %s", #call, rc_,                        \
                 kvt_last_error_message());                                                   \
        if (kvt_last_error_message()[0] != '\0')                                              \
            fail(__FILE__, __LINE__, "%s succeeded but left a message: %s", #call,            \
                 kvt_last_error_message());                                                   \
    } while (0)


static uint8_t pattern(size_t i, unsigned seed) { return (uint8_t)((i * 131u + seed * 7u) ^ (i >> 9)); }

static void fill(uint8_t *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) p[i] = pattern(i, seed);
}

static kvt_engine *start_engine(void) {
    kvt_engine_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.struct_size = sizeof cfg;
    cfg.listen = "127.0.0.1:0";
    cfg.transport = KVT_TRANSPORT_TCP;
    cfg.batch_timeout_ms = 20000;
    kvt_engine *e = NULL;
    OK(kvt_engine_create(&cfg, &e));
    CHECK(e != NULL);
    return e;
}

/* Polls until the batch is final, at most `limit_s` seconds; returns the final status. */
static int32_t poll_until_final(kvt_engine *e, uint64_t batch, double limit_s) {
    double deadline = now_s() + limit_s;
    int32_t status = KVT_BATCH_PENDING;
    while (status == KVT_BATCH_PENDING) {
        if (now_s() > deadline) fail(__FILE__, __LINE__, "batch %llu still pending", (unsigned long long)batch);
        int32_t rc = kvt_batch_poll(e, batch, &status);
        if (rc != KVT_OK) fail(__FILE__, __LINE__, "kvt_batch_poll: %d %s", rc, kvt_last_error_message());
    }
    return status;
}

int main(void) {
    CHECK(kvt_abi_version() == KVT_ABI_VERSION);

    /* A C program starts with SIGPIPE at its default action (terminate). */
    struct sigaction sa;
    CHECK(sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL);

    /* Two engines in one process: `target` plays the decode side, `initiator` prefill. */
    kvt_engine *target = start_engine();
    kvt_engine *initiator = start_engine();

    /* The library leaves it alone: its writes use MSG_NOSIGNAL, so a peer that goes away
     * cannot kill us even at the default action. */
    CHECK(sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL);

    char addr[64], transport[16];
    OK(kvt_engine_local_addr(target, addr, sizeof addr));
    OK(kvt_engine_transport(initiator, transport, sizeof transport));
    CHECK(strncmp(addr, "127.0.0.1:", 10) == 0);
    CHECK(strcmp(transport, "tcp") == 0);
    printf("target listens on %s, transport %s\n", addr, transport);

    /* Caller-owned memory, registered as segments. */
    const size_t len = 4 * MIB;
    uint8_t *dst = malloc(len), *src = malloc(len), *back = malloc(len);
    CHECK(dst && src && back);
    memset(dst, 0, len);
    memset(back, 0, len);
    fill(src, len, 1);
    uint32_t dst_seg = 0, src_seg = 0, back_seg = 0;
    OK(kvt_engine_register(target, (uint64_t)(uintptr_t)dst, len, &dst_seg));
    OK(kvt_engine_register(initiator, (uint64_t)(uintptr_t)src, len, &src_seg));
    OK(kvt_engine_register(initiator, (uint64_t)(uintptr_t)back, len, &back_seg));
    CHECK(src_seg != back_seg);

    uint64_t peer = 0;
    OK(kvt_engine_connect(initiator, addr, &peer));

    /* WRITE batch, polled: 64 KiB blocks to reversed destination slots (nothing coalesces). */
    enum { BLOCKS = 64 };
    const uint64_t block = 64 * 1024;
    kvt_request reqs[BLOCKS];
    for (int i = 0; i < BLOCKS; i++) {
        reqs[i].op = KVT_OP_WRITE;
        reqs[i].remote_segment = dst_seg;
        reqs[i].local_addr = (uint64_t)(uintptr_t)src + (uint64_t)i * block;
        reqs[i].len = block;
        reqs[i].remote_offset = (uint64_t)(BLOCKS - 1 - i) * block;
    }
    uint64_t batch = 0;
    OK(kvt_batch_submit(initiator, peer, reqs, BLOCKS, 0, &batch));
    CHECK(poll_until_final(initiator, batch, 20.0) == KVT_BATCH_DONE);
    CHECK(kvt_last_error_message()[0] == '\0');
    OK(kvt_batch_release(initiator, batch));
    for (int i = 0; i < BLOCKS; i++)
        CHECK(memcmp(dst + (size_t)(BLOCKS - 1 - i) * block, src + (size_t)i * block, block) == 0);
    printf("write batch: verified %llu bytes\n", (unsigned long long)(BLOCKS * block));

    /* READ batch, waited: the whole 4 MiB back, in one request of 1 MiB and 48 of 64 KiB. */
    kvt_request rd[BLOCKS];
    rd[0].op = KVT_OP_READ;
    rd[0].remote_segment = dst_seg;
    rd[0].local_addr = (uint64_t)(uintptr_t)back;
    rd[0].len = MIB;
    rd[0].remote_offset = 0;
    for (int i = 1; i < 49; i++) {
        rd[i] = rd[0];
        rd[i].len = block;
        rd[i].local_addr = (uint64_t)(uintptr_t)back + MIB + (uint64_t)(i - 1) * block;
        rd[i].remote_offset = MIB + (uint64_t)(i - 1) * block;
    }
    OK(kvt_batch_submit(initiator, peer, rd, 49, 10000, &batch));
    /* What this batch moved, before and after it ends. */
    kvt_batch_metrics bm;
    memset(&bm, 0, sizeof bm);
    FAILS(kvt_batch_get_metrics(initiator, batch, &bm), KVT_ERR_INVALID_ARGUMENT, "struct_size");
    bm.struct_size = sizeof bm;
    OK(kvt_batch_get_metrics(initiator, batch, &bm));
    CHECK(bm.bytes_read == 4 * MIB && bm.bytes_written == 0);
    OK(kvt_batch_wait_metrics(initiator, batch, &bm));
    CHECK(bm.bytes_read == 4 * MIB && bm.bytes_written == 0 && bm.latency_ns > 0);
    CHECK(kvt_batch_get_metrics(initiator, batch, &bm) != KVT_OK); /* released by the wait */
    CHECK(memcmp(back, dst, 4 * MIB) == 0);
    printf("read batch: verified %u bytes in %.3f ms\n", 4 * MIB, (double)bm.latency_ns / 1e6);

    /* Address-based writes (Mooncake style): destinations are the target's addresses. */
    fill(src, len, 2);
    uint64_t s[3], d[3], l[3];
    for (int i = 0; i < 3; i++) {
        s[i] = (uint64_t)(uintptr_t)src + (uint64_t)i * MIB;
        d[i] = (uint64_t)(uintptr_t)dst + (uint64_t)(2 - i) * MIB + 4096;
        l[i] = 100000 + (uint64_t)i;
    }
    uint32_t seg = 0;
    uint64_t off = 0;
    OK(kvt_engine_resolve_remote(initiator, peer, d[1], l[1], &seg, &off));
    CHECK(seg == dst_seg && off == MIB + 4096);
    OK(kvt_transfer_sync_write(initiator, peer, s, d, l, 3));
    for (int i = 0; i < 3; i++)
        CHECK(memcmp(dst + (2 - i) * MIB + 4096, src + i * MIB, l[i]) == 0);
    fill(src, len, 3);
    OK(kvt_transfer_submit_write(initiator, peer, s, d, l, 3, &batch));
    OK(kvt_batch_wait(initiator, batch));
    for (int i = 0; i < 3; i++)
        CHECK(memcmp(dst + (2 - i) * MIB + 4096, src + i * MIB, l[i]) == 0);
    printf("address writes: verified %llu bytes twice\n", (unsigned long long)(l[0] + l[1] + l[2]));

    /* Address-based reads, sync and submitted, back into the initiator's own segment. */
    uint64_t rs[1] = {(uint64_t)(uintptr_t)back}, rdst[1] = {d[1]}, rl[1] = {l[1]};
    memset(back, 0, l[1]);
    OK(kvt_transfer_sync(initiator, peer, KVT_OP_READ, rs, rdst, rl, 1));
    CHECK(memcmp(back, src + MIB, l[1]) == 0);
    memset(back, 0, l[1]);
    OK(kvt_transfer_submit(initiator, peer, KVT_OP_READ, rs, rdst, rl, 1, 10000, &batch));
    OK(kvt_batch_wait(initiator, batch));
    CHECK(memcmp(back, src + MIB, l[1]) == 0);
    FAILS(kvt_transfer_sync(initiator, peer, 7, rs, rdst, rl, 1), KVT_ERR_INVALID_ARGUMENT,
          "op is 7");

    /* The peer's segments: count first, then the list. */
    size_t nseg = 0;
    OK(kvt_engine_remote_segments(initiator, peer, false, NULL, 0, &nseg));
    CHECK(nseg == 1);
    kvt_segment segs[2];
    memset(segs, 0, sizeof segs);
    OK(kvt_engine_remote_segments(initiator, peer, true, segs, 2, &nseg));
    CHECK(nseg == 1 && segs[0].id == dst_seg && segs[0].kind == KVT_MEMORY_HOST);
    CHECK(segs[0].base == (uint64_t)(uintptr_t)dst && segs[0].len == len);

    /* A liveness probe: the target answers with its id and epoch; nothing answers elsewhere. */
    uint64_t engine_id = 0, epoch = 0;
    OK(kvt_engine_probe(initiator, addr, 2000, &engine_id, &epoch));
    CHECK(engine_id != 0 && epoch != 0);
    OK(kvt_engine_probe(initiator, addr, 0, NULL, NULL));
    CHECK(kvt_engine_probe(initiator, "127.0.0.1:1", 500, &engine_id, &epoch) == KVT_ERR_IO);

    /* The topology matrix is JSON ("{}" where there is no RDMA). */
    char topo[4096];
    OK(kvt_local_topology(NULL, topo, sizeof topo));
    CHECK(topo[0] == '{' && topo[strlen(topo) - 1] == '}');
    printf("reads, segments, probe, topology %s: ok\n", topo);

    /* Error paths: each gives its code and a message; out-parameters stay untouched. */
    uint32_t untouched = 777;
    FAILS(kvt_engine_register(NULL, (uint64_t)(uintptr_t)src, len, &untouched),
          KVT_ERR_INVALID_ARGUMENT, "e is NULL");
    CHECK(untouched == 777);
    FAILS(kvt_engine_register(target, (uint64_t)(uintptr_t)dst, len, NULL),
          KVT_ERR_INVALID_ARGUMENT, "out_segment is NULL");
    FAILS(kvt_batch_wait(NULL, 1), KVT_ERR_INVALID_ARGUMENT, "e is NULL");
    FAILS(kvt_engine_connect(initiator, NULL, &peer), KVT_ERR_INVALID_ARGUMENT, "addr is NULL");
    FAILS(kvt_batch_submit(initiator, peer, NULL, 2, 0, &batch), KVT_ERR_INVALID_ARGUMENT,
          "reqs is NULL");
    FAILS(kvt_engine_register(target, (uint64_t)(uintptr_t)dst + 4096, 4096, &untouched),
          KVT_ERR_OVERLAPPING_REGISTRATION, "overlaps registered segment");
    FAILS(kvt_engine_register(target, (uint64_t)(uintptr_t)dst, 0, &untouched),
          KVT_ERR_ZERO_LENGTH, "zero-length");

    /* Memory that was never registered. */
    uint8_t *stray = malloc(8192);
    CHECK(stray != NULL);
    kvt_request bad = reqs[0];
    bad.local_addr = (uint64_t)(uintptr_t)stray;
    bad.len = 8192;
    uint64_t untouched_batch = 4242;
    FAILS(kvt_batch_submit(initiator, peer, &bad, 1, 0, &untouched_batch),
          KVT_ERR_UNREGISTERED_ADDRESS, "is not inside a registered segment");
    CHECK(untouched_batch == 4242);
    s[0] = (uint64_t)(uintptr_t)stray;
    FAILS(kvt_transfer_sync_write(initiator, peer, s, d, l, 1), KVT_ERR_UNREGISTERED_ADDRESS,
          "is not inside a registered segment");
    FAILS(kvt_engine_resolve_remote(initiator, peer, (uint64_t)(uintptr_t)stray, 16, &seg, &off),
          KVT_ERR_REMOTE_UNREGISTERED, "not inside a segment the peer registered");
    bad = reqs[0];
    bad.remote_offset = len - 100;
    FAILS(kvt_batch_submit(initiator, peer, &bad, 1, 0, &batch), KVT_ERR_REMOTE_OUT_OF_RANGE,
          "is outside segment");
    bad = reqs[0];
    bad.op = 9;
    FAILS(kvt_batch_submit(initiator, peer, &bad, 1, 0, &batch), KVT_ERR_INVALID_ARGUMENT,
          "reqs[0].op is 9");
    FAILS(kvt_batch_submit(initiator, peer + 100, reqs, 1, 0, &batch), KVT_ERR_UNKNOWN_PEER,
          "unknown peer");
    int32_t status = -1;
    FAILS(kvt_batch_poll(initiator, 999999, &status), KVT_ERR_UNKNOWN_BATCH, "unknown batch");
    CHECK(status == -1);

    /* A struct_size that was not set, and one that covers only `listen`. */
    kvt_engine_config cfg;
    memset(&cfg, 0, sizeof cfg);
    kvt_engine *never = NULL;
    FAILS(kvt_engine_create(&cfg, &never), KVT_ERR_INVALID_ARGUMENT, "cfg->struct_size is 0");
    CHECK(never == NULL);
    cfg.struct_size = 2;
    FAILS(kvt_engine_create(&cfg, &never), KVT_ERR_INVALID_ARGUMENT, "struct_size is 2");
    cfg.struct_size = 16; /* struct_size + listen: transport (RDMA here) is not read */
    cfg.listen = "127.0.0.1:0";
    cfg.transport = KVT_TRANSPORT_RDMA;
    cfg.connections_per_peer = 1000; /* invalid, but not covered either */
    kvt_engine *old_caller = NULL;
    OK(kvt_engine_create(&cfg, &old_caller));
    OK(kvt_engine_destroy(old_caller));
    cfg.struct_size = sizeof cfg;
    cfg.transport = 7;
    cfg.connections_per_peer = 0;
    FAILS(kvt_engine_create(&cfg, &never), KVT_ERR_INVALID_CONFIG, "transport");
    cfg.transport = KVT_TRANSPORT_TCP;
    cfg.listen = "not an address";
    FAILS(kvt_engine_create(&cfg, &never), KVT_ERR_INVALID_CONFIG, "listen");
    CHECK(never == NULL);

    /* String out-buffers are never truncated. */
    char small[8];
    memset(small, '#', sizeof small);
    FAILS(kvt_engine_local_addr(target, small, sizeof small), KVT_ERR_INVALID_ARGUMENT,
          "pass at least");
    CHECK(small[0] == '#' && small[7] == '#');
    OK(kvt_engine_transport(target, small, 4));
    CHECK(strcmp(small, "tcp") == 0);
    FAILS(kvt_engine_transport(target, small, 3), KVT_ERR_INVALID_ARGUMENT, "pass at least 4");

    /* Segments: unregister, then the id is unknown; destroy(NULL) is fine. */
    OK(kvt_engine_unregister(initiator, back_seg));
    FAILS(kvt_engine_unregister(initiator, back_seg), KVT_ERR_UNKNOWN_SEGMENT, "unknown segment");
    OK(kvt_engine_destroy(NULL));

    /* A lost peer: with the target gone, a write cannot succeed, at submit or in the batch
     * (and the write into the closed socket must not kill the process with SIGPIPE). */
    OK(kvt_engine_destroy(target));
    int32_t rc = kvt_batch_submit(initiator, peer, reqs, BLOCKS, 5000, &batch);
    if (rc == KVT_OK) {
        rc = kvt_batch_wait(initiator, batch);
        CHECK(rc == KVT_ERR_BATCH_FAILED);
    }
    CHECK(rc < 0 && kvt_last_error_message()[0] != '\0');
    printf("write to a destroyed peer fails: %d: %s\n", rc, kvt_last_error_message());

    /* Disconnect forgets the handle. */
    OK(kvt_engine_disconnect(initiator, peer));
    FAILS(kvt_engine_disconnect(initiator, peer), KVT_ERR_UNKNOWN_PEER, "unknown peer");

    OK(kvt_engine_destroy(initiator));
    free(dst);
    free(src);
    free(back);
    free(stray);
    printf("engine.c: all checks passed\n");
    return 0;
}
