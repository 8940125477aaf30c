/*
 * The static library beside libibverbs: this program links scripts/static-lib.sh's
 * libkvtransfer.a and the system's libibverbs. It must link (no "multiple definition of
 * ibv_*"), its ibv_* calls must reach libibverbs itself (not a copy inside our archive), and
 * kvtransfer must still work: an engine on the auto transport (which asks libibverbs for
 * devices through its own loader, then falls back to TCP here) writes to another and the
 * bytes are verified. Built and run by tests/static_lib.rs.
 */
#define _GNU_SOURCE

#include "check.h"

#include <dlfcn.h>
#include <errno.h>
#include <infiniband/verbs.h>

#define LEN (1u << 20)

static kvt_engine *start_engine(uint32_t transport) {
    kvt_engine_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.struct_size = sizeof cfg;
    cfg.listen = "127.0.0.1:0";
    cfg.transport = transport;
    cfg.batch_timeout_ms = 20000;
    kvt_engine *e = NULL;
    if (kvt_engine_create(&cfg, &e) != KVT_OK)
        fail(__FILE__, __LINE__, "kvt_engine_create: %s", kvt_last_error_message());
    return e;
}

int main(void) {
    /* The program's ibv_get_device_list is libibverbs' own. */
    Dl_info info;
    CHECK(dladdr((void *)(uintptr_t)&ibv_get_device_list, &info) != 0 && info.dli_fname != NULL);
    if (strstr(info.dli_fname, "libibverbs") == NULL)
        fail(__FILE__, __LINE__, "ibv_get_device_list resolved into %s, not libibverbs", info.dli_fname);
    int n = -1;
    struct ibv_device **list = ibv_get_device_list(&n);
    printf("libibverbs (%s): %d device(s)%s\n", info.dli_fname, list ? n : 0,
           list ? "" : " (no kernel RDMA support)");
    if (list) ibv_free_device_list(list);

    kvt_engine *target = start_engine(KVT_TRANSPORT_TCP);
    kvt_engine *initiator = start_engine(KVT_TRANSPORT_AUTO);
    char addr[64], transport[16];
    CHECK(kvt_engine_local_addr(target, addr, sizeof addr) == KVT_OK);
    CHECK(kvt_engine_transport(initiator, transport, sizeof transport) == KVT_OK);

    uint8_t *dst = calloc(1, LEN), *src = malloc(LEN);
    CHECK(dst && src);
    for (size_t i = 0; i < LEN; i++) src[i] = (uint8_t)(i * 31u + (i >> 11));
    uint32_t dst_seg = 0, src_seg = 0;
    CHECK(kvt_engine_register(target, (uint64_t)(uintptr_t)dst, LEN, &dst_seg) == KVT_OK);
    CHECK(kvt_engine_register(initiator, (uint64_t)(uintptr_t)src, LEN, &src_seg) == KVT_OK);
    uint64_t peer = 0;
    CHECK(kvt_engine_connect(initiator, addr, &peer) == KVT_OK);
    uint64_t s = (uint64_t)(uintptr_t)src, d = (uint64_t)(uintptr_t)dst, l = LEN;
    double t0 = now_s();
    if (kvt_transfer_sync(initiator, peer, KVT_OP_WRITE, &s, &d, &l, 1) != KVT_OK)
        fail(__FILE__, __LINE__, "kvt_transfer_sync: %s", kvt_last_error_message());
    CHECK(memcmp(dst, src, LEN) == 0);
    printf("engine on %s: verified %u bytes (%.1f ms)\n", transport, LEN, (now_s() - t0) * 1e3);

    CHECK(kvt_engine_destroy(initiator) == KVT_OK);
    CHECK(kvt_engine_destroy(target) == KVT_OK);
    free(dst);
    free(src);
    printf("static_ibverbs.c: all checks passed\n");
    return 0;
}
