//! The `mxpipe` command-line tool: bulk sends, the built-in sink, the throughput benchmark and a
//! self-contained demo. The commands live in `src/cli/`, one module each.
//!
//! ```text
//! mxpipe demo                                   # a bulk send to the built-in sink, no setup
//! mxpipe sink --listen 127.0.0.1:2525           # a fast SMTP sink
//! mxpipe send --relay 127.0.0.1:2525 --from news@example.org --to-file list.txt msg.eml
//! mxpipe send campaign.toml --report report.csv --journal campaign.journal
//! mxpipe send campaign.toml --dry-run rendered/
//! mxpipe bench --messages 200000 --size 2048 --connections 20
//! mxpipe send --direct-mx --from news@example.org --to-file list.txt msg.eml --metrics 127.0.0.1:9464
//! ```

#[path = "../cli/mod.rs"]
mod cli;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    no_huge_pages();
    cli::main()
}

/// Turns transparent huge pages off for this process (and the processes it starts), unless
/// `MXPIPE_THP=1`. With them on, the kernel zeroes each fresh 2 MiB region of the heap whole at
/// its first touch: a spooled send of one body to a million distinct recipients spent a tenth
/// of its time there, against the same send in memory (README "Benchmarks"). Only the command
/// line does this: the library never changes its host process.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MXPIPE_THP").is_none_or(|v| v != "1") {
        // SAFETY: PR_SET_THP_DISABLE takes integers only and changes nothing but this flag;
        // it fails only on kernels without it, where there is nothing to turn off.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
}
