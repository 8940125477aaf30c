//! `kvtransfer`: demo transfer, bandwidth/latency benchmark, device listing and doctor.

mod bench;
mod demo;
mod devices;
mod doctor;
mod kvbench;
mod kvscale;
mod report;
mod scale;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Moves KV cache between engines; run `kvtransfer demo` for a verified transfer.
#[derive(Parser, Debug)]
#[command(name = "kvtransfer", version, about)]
struct Cli {
    /// Log filter (also KVT_LOG / RUST_LOG), e.g. info or kvtransfer=debug.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Two engines in this process move a DeepSeek-shaped KV cache and verify every byte.
    Demo(demo::DemoArgs),
    /// Measures bandwidth or latency of batched transfers, or KV rooms (`--kv MODEL`).
    Bench(Box<bench::BenchArgs>),
    /// Lists RDMA ports, the GID each would use, and which transport `auto` picks.
    Devices(devices::DevicesArgs),
    /// Checks RDMA and GPU prerequisites, explains each problem with its fix, and maps GPUs to rails.
    Doctor(doctor::DoctorArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("KVT_LOG").ok())
        .unwrap_or_else(|| "warn".into());
    kvtransfer::init_logging(&filter);
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(*a),
        Command::Devices(a) => devices::run(a),
        Command::Doctor(a) => doctor::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvtransfer: {e}");
            ExitCode::FAILURE
        }
    }
}
