use std::process::ExitCode;

use clap::Parser;

mod cli;

// Tokenizing allocates many small buffers on every thread; glibc's malloc spent about half of
// `encode`'s time on them (perf), mimalloc's per-thread heaps far less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay`: option 15 of the mimalloc v3 header that libmimalloc-sys builds
/// (the crate names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Training frees and allocates the same multi-megabyte activations in every layer. mimalloc
/// returns freed memory to the OS after a delay, so each reuse faulted the pages in and zeroed
/// them again: 10% of training time went to the kernel's `clear_page` (perf). Never purging
/// keeps them mapped: 346 -> 391 tokens/s training the 30M bench model, peak RSS 0.51 -> 0.66
/// GiB. `MIMALLOC_PURGE_DELAY` set by the user still wins.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads it on its next purge decision.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let err = failure.error();
            swift_rs::say!("error: {err}");
            for cause in err.chain().skip(1) {
                swift_rs::say!("  caused by: {cause}");
            }
            ExitCode::from(failure.exit_code())
        }
    }
}
