//! The `tracer-agent` binary: CLI and glue only.

use std::process::ExitCode;

use clap::Parser;
use tracer_agent::{
    agent,
    config::{Cli, Command, Config},
};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => {
            if tracer_agent::check::run() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some(Command::Health { listen }) => match tracer_agent::conns::get(listen, "/healthz") {
            Ok((200, body)) => {
                print!("{body}");
                ExitCode::SUCCESS
            }
            Ok((status, body)) => {
                eprint!("tracer-agent: {status} {body}");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("tracer-agent: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::ConfigCheck) => match Config::from_args(&cli.run) {
            Ok(c) => {
                println!("{c:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tracer-agent: {e}");
                ExitCode::from(2)
            }
        },
        Some(Command::Conns { listen }) => match tracer_agent::conns::fetch(listen) {
            Ok(pools) => {
                print!("{}", tracer_agent::conns::render(&pools));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tracer-agent: {e}");
                ExitCode::FAILURE
            }
        },
        None => {
            let config = match Config::from_args(&cli.run) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tracer-agent: {e}");
                    return ExitCode::from(2);
                }
            };
            // Capabilities are per thread: once the programs are attached, each of
            // the runtime's threads gives its up too (see privileges.rs).
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .on_thread_start(tracer_agent::privileges::follow_on_this_thread)
                .on_thread_park(tracer_agent::privileges::follow_on_this_thread)
                .on_thread_unpark(tracer_agent::privileges::follow_on_this_thread)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("tracer-agent: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(agent::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tracer-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
