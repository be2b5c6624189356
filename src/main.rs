use std::process::ExitCode;

use clap::Parser;

mod cli;

// Tokenizing allocates many small buffers on every thread; glibc's malloc spent about half of
// `encode`'s time on them (perf), mimalloc's per-thread heaps far less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let err = failure.error();
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(failure.exit_code())
        }
    }
}
