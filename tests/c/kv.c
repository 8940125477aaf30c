/*
 * KV part of the C ABI, driven from C: a small room end to end with metrics, then the error
 * paths (config struct checks, wrong roles, duplicate rooms, bad pages and aux slots, buffers
 * too small), an aborted room seen from both sides, an unreachable prefill side, and room
 * handles that outlive their manager. Built and run by tests/c_abi.rs.
 */
#define _POSIX_C_SOURCE 200809L

#include "check.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/socket.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { LAYERS = 2, PAGES = 16, PAGE = 4096, AUX_SLOTS = 4, AUX = 64 };


#define OK(call)                                                                              \
    do {                                                                                      \
        int32_t rc_ = (call);                                                                 \
        if (rc_ != KVT_OK)                                                                    \
            fail(__FILE__, __LINE__, "%s returned %d: %s", #call, rc_,                        \
                 kvt_last_error_message());                                                   \
    } while (0)


struct side {
    uint8_t *mem[LAYERS];
    uint8_t *aux;
    kvt_kv_buffer buffers[LAYERS];
    kvt_kv_buffer aux_buffer;
    kvt_kv_config kv;
};

static void side_init(struct side *s, uint32_t role, uint8_t seed) {
    for (int l = 0; l < LAYERS; l++) {
        s->mem[l] = malloc(PAGES * PAGE);
        CHECK(s->mem[l] != NULL);
        for (int i = 0; i < PAGES * PAGE; i++) s->mem[l][i] = seed ? (uint8_t)(i / PAGE * 16 + l + seed) : 0;
        s->buffers[l].addr = (uint64_t)(uintptr_t)s->mem[l];
        s->buffers[l].len = PAGES * PAGE;
        s->buffers[l].item_len = PAGE;
    }
    s->aux = malloc(AUX_SLOTS * AUX);
    CHECK(s->aux != NULL);
    memset(s->aux, seed, AUX_SLOTS * AUX);
    s->aux_buffer.addr = (uint64_t)(uintptr_t)s->aux;
    s->aux_buffer.len = AUX_SLOTS * AUX;
    s->aux_buffer.item_len = AUX;
    memset(&s->kv, 0, sizeof s->kv);
    s->kv.struct_size = sizeof s->kv;
    s->kv.role = role;
    s->kv.room_timeout_ms = 20000;
    s->kv.abort_timeout_ms = 5000;
    s->kv.buffers = s->buffers;
    s->kv.num_buffers = LAYERS;
    s->kv.aux = &s->aux_buffer;
    s->kv.num_aux = 1;
    s->kv.connect_timeout_ms = 1000;
}

static kvt_kv_manager *manager(const struct side *s) {
    kvt_engine_config e;
    memset(&e, 0, sizeof e);
    e.struct_size = sizeof e;
    e.transport = KVT_TRANSPORT_TCP;
    kvt_kv_manager *m = NULL;
    OK(kvt_kv_manager_create(&e, &s->kv, &m));
    return m;
}

/* Polls until the state is final or `want`; returns it. */
static int32_t sender_until(kvt_kv_sender *s, int32_t want) {
    double deadline = now_s() + 20;
    int32_t st;
    do {
        OK(kvt_kv_sender_poll(s, &st));
        if (now_s() > deadline) fail(__FILE__, __LINE__, "sender stuck in %d", st);
    } while (st != want && st != KVT_POLL_FAILED && st != KVT_POLL_SUCCESS);
    return st;
}

static int32_t receiver_until_final(kvt_kv_receiver *r) {
    double deadline = now_s() + 20;
    int32_t st;
    do {
        OK(kvt_kv_receiver_poll(r, &st));
        if (now_s() > deadline) fail(__FILE__, __LINE__, "receiver stuck in %d", st);
    } while (st != KVT_POLL_FAILED && st != KVT_POLL_SUCCESS);
    return st;
}

static volatile sig_atomic_t sigpipes;
static void on_sigpipe(int sig) {
    (void)sig;
    sigpipes++;
}

int main(void) {
    /* This program handles SIGPIPE itself: the library must leave that handler alone. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigpipe;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGPIPE, &sa, NULL) == 0);

    struct side pre, dec;
    side_init(&pre, KVT_ROLE_PREFILL, 1);
    side_init(&dec, KVT_ROLE_DECODE, 0);
    dec.kv.integrity = 1; /* every chunk checked against the sender's digest */

    /* Config checks before any manager exists. */
    kvt_kv_manager *never = NULL;
    FAILS(kvt_kv_manager_create(NULL, NULL, &never), KVT_ERR_INVALID_ARGUMENT, "kv is NULL");
    kvt_kv_config bad = pre.kv;
    bad.struct_size = 0;
    FAILS(kvt_kv_manager_create(NULL, &bad, &never), KVT_ERR_INVALID_ARGUMENT,
          "kv->struct_size is 0");
    bad = pre.kv;
    bad.role = 5;
    FAILS(kvt_kv_manager_create(NULL, &bad, &never), KVT_ERR_INVALID_CONFIG, "role");
    bad = pre.kv;
    bad.integrity = 7;
    FAILS(kvt_kv_manager_create(NULL, &bad, &never), KVT_ERR_INVALID_CONFIG, "integrity");
    bad = pre.kv;
    bad.num_buffers = 0;
    FAILS(kvt_kv_manager_create(NULL, &bad, &never), KVT_ERR_INVALID_ARGUMENT,
          "at least one page buffer");
    bad = pre.kv;
    bad.aux = NULL;
    FAILS(kvt_kv_manager_create(NULL, &bad, &never), KVT_ERR_INVALID_ARGUMENT, "kv->aux is NULL");
    CHECK(never == NULL);

    kvt_kv_manager *prefill = manager(&pre);
    kvt_kv_manager *decode = manager(&dec);
    CHECK(sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == on_sigpipe);
    char addr[64];
    OK(kvt_kv_manager_bootstrap_addr(prefill, addr, sizeof addr));
    char tiny[4];
    FAILS(kvt_kv_manager_bootstrap_addr(prefill, tiny, sizeof tiny), KVT_ERR_INVALID_ARGUMENT,
          "pass at least");

    /* A room of 5 pages (two chunks), aux slot 1 -> 3; the destination pages are scattered. */
    const int32_t src[5] = {0, 1, 2, 9, 4};
    const int32_t dst[5] = {15, 3, 4, 5, 0};
    kvt_kv_receiver *r = NULL;
    kvt_kv_sender *s = NULL;
    OK(kvt_kv_receiver_create(decode, addr, 1, &r));
    OK(kvt_kv_receiver_init(r, dst, 5, 3));
    OK(kvt_kv_sender_create(prefill, 1, &s));
    OK(kvt_kv_sender_init(s, 5, 1));
    CHECK(sender_until(s, KVT_POLL_WAITING_FOR_INPUT) == KVT_POLL_WAITING_FOR_INPUT);
    char reason[256];
    OK(kvt_kv_sender_failure_reason(s, reason, sizeof reason));
    CHECK(reason[0] == '\0');
    OK(kvt_kv_sender_send(s, src, 3, false));
    OK(kvt_kv_sender_send(s, src + 3, 2, true));
    CHECK(receiver_until_final(r) == KVT_POLL_SUCCESS);
    CHECK(sender_until(s, KVT_POLL_SUCCESS) == KVT_POLL_SUCCESS);
    for (int l = 0; l < LAYERS; l++)
        for (int i = 0; i < 5; i++)
            CHECK(memcmp(dec.mem[l] + dst[i] * PAGE, pre.mem[l] + src[i] * PAGE, PAGE) == 0);
    CHECK(memcmp(dec.aux + 3 * AUX, pre.aux + 1 * AUX, AUX) == 0);
    CHECK(dec.aux[2 * AUX] == 0);

    kvt_room_metrics m;
    memset(&m, 0, sizeof m);
    m.struct_size = sizeof m;
    OK(kvt_kv_receiver_metrics(r, &m));
    CHECK(m.bytes == 5 * LAYERS * PAGE + AUX);
    OK(kvt_kv_sender_metrics(s, &m));
    CHECK(m.bytes == 5 * LAYERS * PAGE + AUX && m.slices > 0 && m.transfer_span_ns > 0);
    /* An older caller whose struct ends after `bytes`: nothing past it is written. */
    memset(&m, 0xAB, sizeof m);
    m.struct_size = 16;
    OK(kvt_kv_sender_metrics(s, &m));
    CHECK(m.bytes == 5 * LAYERS * PAGE + AUX && m.slices == 0xABABABABABABABABull);
    m.struct_size = 0;
    FAILS(kvt_kv_sender_metrics(s, &m), KVT_ERR_INVALID_ARGUMENT, "out->struct_size is 0");
    printf("room 1: %llu bytes verified\n", (unsigned long long)(5 * LAYERS * PAGE + AUX));
    /* A finished room cannot send again. */
    FAILS(kvt_kv_sender_send(s, src, 1, true), KVT_ERR_ROOM_STATE, "room 1");
    OK(kvt_kv_sender_destroy(s));
    OK(kvt_kv_receiver_destroy(r));

    /* Wrong roles, NULL handles, duplicate rooms, bad pages and aux slots. */
    FAILS(kvt_kv_sender_create(decode, 2, &s), KVT_ERR_INVALID_ARGUMENT, "prefill manager");
    FAILS(kvt_kv_receiver_create(prefill, addr, 2, &r), KVT_ERR_INVALID_ARGUMENT,
          "decode manager");
    FAILS(kvt_kv_sender_create(NULL, 2, &s), KVT_ERR_INVALID_ARGUMENT, "m is NULL");
    FAILS(kvt_kv_receiver_create(decode, NULL, 2, &r), KVT_ERR_INVALID_ARGUMENT,
          "bootstrap_addr is NULL");
    int32_t st = -7;
    FAILS(kvt_kv_sender_poll(NULL, &st), KVT_ERR_INVALID_ARGUMENT, "s is NULL");
    CHECK(st == -7);
    OK(kvt_kv_sender_create(prefill, 2, &s));
    kvt_kv_sender *dup = NULL;
    FAILS(kvt_kv_sender_create(prefill, 2, &dup), KVT_ERR_DUPLICATE_ROOM, "room 2 already exists");
    CHECK(dup == NULL);
    FAILS(kvt_kv_sender_init(s, 2, AUX_SLOTS), KVT_ERR_INVALID_PAGES, "aux index 4");
    OK(kvt_kv_receiver_create(decode, addr, 2, &r));
    const int32_t out_of_range[2] = {1, PAGES};
    const int32_t twice[2] = {3, 3};
    FAILS(kvt_kv_receiver_init(r, out_of_range, 2, -1), KVT_ERR_INVALID_PAGES, "room 2");
    FAILS(kvt_kv_receiver_init(r, twice, 2, -1), KVT_ERR_INVALID_PAGES, "room 2");
    FAILS(kvt_kv_receiver_init(r, NULL, 2, -1), KVT_ERR_INVALID_ARGUMENT, "pages is NULL");

    /* An aborted room: the sender aborts; both sides end FAILED with a reason. */
    OK(kvt_kv_receiver_init(r, dst, 2, -1));
    OK(kvt_kv_sender_init(s, 2, -1));
    CHECK(sender_until(s, KVT_POLL_WAITING_FOR_INPUT) == KVT_POLL_WAITING_FOR_INPUT);
    OK(kvt_kv_sender_abort(s));
    OK(kvt_kv_sender_poll(s, &st));
    CHECK(st == KVT_POLL_FAILED);
    /* A failed poll still returns KVT_OK, with the reason as the message. */
    CHECK(strstr(kvt_last_error_message(), "aborted") != NULL);
    OK(kvt_kv_sender_failure_reason(s, reason, sizeof reason));
    CHECK(strstr(reason, "aborted") != NULL);
    FAILS(kvt_kv_sender_failure_reason(s, reason, 3), KVT_ERR_INVALID_ARGUMENT, "pass at least");
    CHECK(receiver_until_final(r) == KVT_POLL_FAILED);
    OK(kvt_kv_receiver_failure_reason(r, reason, sizeof reason));
    CHECK(reason[0] != '\0');
    printf("aborted room: receiver says: %s\n", reason);
    FAILS(kvt_kv_sender_send(s, src, 2, true), KVT_ERR_ROOM_STATE, "room 2 is Failed");
    OK(kvt_kv_sender_destroy(s));
    OK(kvt_kv_receiver_destroy(r));

    /* A prefill side that does not answer fails the room, not the create call. */
    OK(kvt_kv_receiver_create(decode, "127.0.0.1:1", 3, &r));
    CHECK(receiver_until_final(r) == KVT_POLL_FAILED);
    OK(kvt_kv_receiver_failure_reason(r, reason, sizeof reason));
    printf("unreachable prefill side: %s\n", reason);
    CHECK(strstr(reason, "127.0.0.1:1") != NULL);
    OK(kvt_kv_receiver_destroy(r));

    /* A listener that accepts and never answers: create and init return at once (the channel
     * opens in the background) and the room fails later as a timeout while Bootstrapping. */
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(lfd >= 0);
    struct sockaddr_in lsa;
    memset(&lsa, 0, sizeof lsa);
    lsa.sin_family = AF_INET;
    lsa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof lsa;
    CHECK(bind(lfd, (struct sockaddr *)&lsa, sizeof lsa) == 0);
    CHECK(listen(lfd, 16) == 0);
    CHECK(getsockname(lfd, (struct sockaddr *)&lsa, &sl) == 0);
    char silent[32];
    snprintf(silent, sizeof silent, "127.0.0.1:%u", (unsigned)ntohs(lsa.sin_port));
    int32_t one_page = 1, kind = -1, in_state = -1;
    double t0 = now_s();
    OK(kvt_kv_receiver_create(decode, silent, 5, &r));
    OK(kvt_kv_receiver_init(r, &one_page, 1, -1));
    double took_ms = (now_s() - t0) * 1e3;
    printf("create + init against a silent listener: %.3f ms\n", took_ms);
    CHECK(took_ms < 50);
    OK(kvt_kv_receiver_poll(r, &st));
    CHECK(st == KVT_POLL_BOOTSTRAPPING);
    OK(kvt_kv_receiver_failure(r, &kind, &in_state));
    CHECK(kind == 0);
    t0 = now_s();
    CHECK(receiver_until_final(r) == KVT_POLL_FAILED);
    OK(kvt_kv_receiver_failure(r, &kind, &in_state));
    OK(kvt_kv_receiver_failure_reason(r, reason, sizeof reason));
    printf("silent listener: kind %d while %d after %.0f ms: %s\n", kind, in_state,
           (now_s() - t0) * 1e3, reason);
    CHECK(kind == KVT_FAILURE_TIMEOUT && in_state == KVT_POLL_BOOTSTRAPPING);
    OK(kvt_kv_receiver_destroy(r));
    close(lfd);

    /* Room handles keep their manager's state alive: destroying the manager first is safe,
     * and fails the rooms it leaves behind as shut down. */
    OK(kvt_kv_sender_create(prefill, 4, &s));
    OK(kvt_kv_manager_destroy(prefill));
    OK(kvt_kv_sender_poll(s, &st));
    CHECK(st == KVT_POLL_FAILED);
    OK(kvt_kv_sender_failure(s, &kind, NULL));
    CHECK(kind == KVT_FAILURE_SHUTDOWN);
    OK(kvt_kv_sender_destroy(s));
    OK(kvt_kv_manager_destroy(decode));
    OK(kvt_kv_manager_destroy(NULL));
    OK(kvt_kv_sender_destroy(NULL));
    OK(kvt_kv_receiver_destroy(NULL));

    for (int l = 0; l < LAYERS; l++) {
        free(pre.mem[l]);
        free(dec.mem[l]);
    }
    free(pre.aux);
    free(dec.aux);
    /* Peers went away mid-room above; the library's writes never raise SIGPIPE. */
    CHECK(sigpipes == 0);
    printf("kv.c: all checks passed\n");
    return 0;
}
