//! What `demo` and `bench` print of an engine's metrics.

use kvtransfer::MetricsSnapshot;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn mean_ms(s: &kvtransfer::Summary) -> String {
    s.mean().map_or_else(
        || "-".into(),
        |d| format!("{:.2} ms", d.as_secs_f64() * 1e3),
    )
}

/// A few lines summing up `m`, headed `who`.
pub(crate) fn summary(who: &str, m: &MetricsSnapshot) -> String {
    let mut out = format!(
        "metrics {who}: batches {} done, {} failed, {} timed out; {:.1} MiB written, {:.1} MiB read; \
         batch latency mean {}; refused {}",
        m.batches_done,
        m.batches_failed,
        m.batches_timed_out,
        mib(m.bytes_written),
        mib(m.bytes_read),
        mean_ms(&m.batch_latency),
        m.refused
    );
    if let Some(r) = &m.rooms {
        out += &format!(
            "\n  rooms: {} started, {} succeeded, {} failed; {:.1} MiB; bootstrap mean {}, transfer mean {}",
            r.started,
            r.succeeded,
            r.failed,
            mib(r.bytes),
            mean_ms(&r.bootstrap),
            mean_ms(&r.transfer)
        );
    }
    for r in &m.rails {
        out += &format!(
            "\n  rail {} ({}): {:.1} MiB, {} WRs, {} errors, {:.1} MiB moved off, {} rejoins",
            r.rail,
            r.device,
            mib(r.posted_bytes),
            r.work_requests,
            r.errors,
            mib(r.moved_out_bytes),
            r.rejoins
        );
    }
    out
}
