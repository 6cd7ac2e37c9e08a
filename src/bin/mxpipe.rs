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
    cli::main()
}
