//! `keytrail-agent`: parses the command line, starts logging and the runtime, maps failure to
//! an exit code. Everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keytrail_agent::config::{AgentConfig, Overrides, RawConfig};
use keytrail_common::logging::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "keytrail-agent",
    version,
    about = "keytrail sidecar: records license events and ships them to the collector"
)]
struct Cli {
    /// Log format on stderr: human or json.
    #[arg(long, global = true, default_value = "human")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Buffer directory (overrides [buffer].dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Collector URL (overrides [ship].collector).
        #[arg(long)]
        collector: Option<String>,
        /// Local API address (overrides [ingest].listen).
        #[arg(long)]
        ingest_listen: Option<String>,
    },
    /// Check a configuration and the files it names; exit 0 when usable.
    Validate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the pseudonym the agent would ship for a license key.
    Fingerprint {
        key: String,
        #[arg(long, default_value = "/etc/keytrail/agent.toml")]
        config: PathBuf,
    },
}

/// glibc's allocator, tuned for a sidecar's memory (docs/benchmarks.md). Called first, before
/// any thread exists; glibc's own variables, when set, win.
///
/// * Two arenas (`MALLOC_ARENA_MAX`): glibc gives every thread that allocates concurrently its
///   own arena and keeps freed memory in each; with the agent's runtime, writer and sealer
///   threads that cost ~40 MiB of RSS under load (peak 90 → 50 MiB at 8 × 500, no loss of
///   throughput; one arena cost a third of it).
/// * Buffers of 256 KiB and more mapped on their own and unmapped when freed
///   (`MALLOC_MMAP_THRESHOLD_`), and the heap's free top returned beyond 1 MiB
///   (`MALLOC_TRIM_THRESHOLD_`). By default glibc raises its mapping threshold to the largest
///   buffer freed so far, after which the group commits', the sealer's and sled's
///   multi-megabyte buffers stay in the arenas. Measured at 8 × 500: peak RSS 56–62 → 43–49
///   MiB, for about a tenth of the top ingest rate (~500 k events/s, from 502–612 k).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (variable, parameter, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 2),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 256 << 10),
        ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, 1 << 20),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: mallopt only sets an allocator parameter; no thread has been started yet.
            #[allow(unsafe_code)]
            unsafe {
                libc::mallopt(parameter, value);
            }
        }
    }
}

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    logging::init(cli.log_format);
    keytrail_common::tls::install_crypto_provider();
    match cli.command {
        Command::Run {
            config,
            data_dir,
            collector,
            ingest_listen,
        } => {
            let overrides = Overrides {
                data_dir,
                collector,
                ingest_listen,
            };
            let config = match AgentConfig::load(config.as_deref(), &overrides) {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            match keytrail_common::serve::run_to_completion(keytrail_agent::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Validate { config } => {
            let result = AgentConfig::load(Some(&config), &Overrides::default())
                .and_then(|c| keytrail_agent::validate(&c).map(|()| c));
            match result {
                Ok(c) => {
                    println!(
                        "{}: ok (agent_id {}, collector {})",
                        config.display(),
                        c.agent_id.as_deref().unwrap_or("<persisted or host name>"),
                        c.ship.collector
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Fingerprint { key, config } => {
            // Only the secret is needed: read just [privacy] so a partial config still works.
            let raw: RawConfig = match keytrail_common::config::load_toml(&config) {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            let Some(path) = raw.privacy.fingerprint_secret_file else {
                return fail(&format!(
                    "config {}: privacy.fingerprint_secret_file is not set",
                    config.display()
                ));
            };
            match keytrail_common::fingerprint::Fingerprinter::from_file(&path) {
                Ok(fp) => {
                    println!("{}", fp.license(&key));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("keytrail-agent: {message}");
    ExitCode::FAILURE
}
