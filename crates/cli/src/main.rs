//! `tensormerge`: the command line of the tensormerge project.
//!
//! A thin binary: clap parses (doc comments are the help text), the commands
//! call the libraries, and one [`printer::Printer`] decides where output goes
//! (results on stdout; progress, warnings and errors on stderr). Exit codes:
//! 0 on success, 1 for bad input (invalid config, incompatible models,
//! unknown method), 2 for usage and I/O errors, 130 when a merge is stopped by
//! SIGINT/SIGTERM (its temporary output directory is removed).

mod cli;
mod commands;
mod inspect;
mod lora;
mod nn;
mod printer;
mod shard;
mod size;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let printer = printer::Printer::new(&cli.global);
    match commands::run(cli.command, &printer) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tensormerge::engine::Progress::finish(&printer);
            printer.error(&e);
            ExitCode::from(printer::exit_code(&e))
        }
    }
}
