//! `keytrail-collector`: parses the command line, starts logging and the runtime, maps failure
//! to an exit code. Everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keytrail_collector::cli::{OutputFormat, QueryArgs};
use keytrail_collector::config::{CollectorConfig, Overrides};
use keytrail_common::logging::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "keytrail-collector",
    version,
    about = "keytrail collector: receives, deduplicates, stores and serves license events"
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
    /// Run the collector.
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory (overrides data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Receive address for agents (overrides [receive].listen).
        #[arg(long)]
        listen: Option<String>,
        /// Analyst API address (overrides [api].listen).
        #[arg(long)]
        api_listen: Option<String>,
    },
    /// Write a development PKI (CA, collector and agent certificates) into a directory.
    Certs {
        #[arg(long)]
        out: PathBuf,
        /// Host name or IP for the collector certificate (repeatable; default localhost and 127.0.0.1).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Agent id to issue a client certificate for (repeatable).
        #[arg(long = "agent")]
        agents: Vec<String>,
    },
    /// Ask a running collector for a metric (docs/metrics.md) and print it.
    Query {
        /// activation-rate, daily-active-validations, validation-failures, utilization,
        /// time-to-first-validation, renewal-rate, time-to-upgrade, time-to-expiration,
        /// active-users, feature-usage, geo, health, mrr, churn-risk or upgrade-signals.
        metric: String,
        /// First day of the window, YYYY-MM-DD (UTC, inclusive; default: to - 29 days).
        #[arg(long)]
        from: Option<String>,
        /// Last day of the window, YYYY-MM-DD (UTC, inclusive; default: the day of --at).
        #[arg(long)]
        to: Option<String>,
        /// Group by plan, product, customer, region, country or deployment.
        #[arg(long)]
        by: Option<String>,
        /// Instant of evaluation for as-of metrics, RFC 3339 (default: now).
        #[arg(long)]
        at: Option<String>,
        /// churn-risk: list licenses with a health score below this (default 50).
        #[arg(long)]
        below: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
        /// The collector's analyst API.
        #[arg(long, default_value = "http://127.0.0.1:7444")]
        api: String,
        /// Bearer token (default: $KEYTRAIL_API_TOKEN; prefer it: arguments are visible in ps).
        #[arg(long)]
        token: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    keytrail_common::tls::install_crypto_provider();
    match cli.command {
        Command::Serve {
            config,
            data_dir,
            listen,
            api_listen,
        } => {
            let overrides = Overrides {
                data_dir,
                listen,
                api_listen,
            };
            let config = match CollectorConfig::load(config.as_deref(), &overrides) {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            match keytrail_common::serve::run_to_completion(keytrail_collector::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Certs { out, hosts, agents } => match keytrail_common::pki::write_dev_pki(&out, &hosts, &agents) {
            Ok(w) => {
                if w.reused_ca {
                    println!("reused the CA in {}", out.display());
                }
                for f in w.files {
                    println!("wrote {}", out.join(f).display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Query {
            metric,
            from,
            to,
            by,
            at,
            below,
            format,
            api,
            token,
        } => {
            let args = QueryArgs {
                metric,
                from,
                to,
                by,
                at,
                below,
                format,
                api,
                token: token.or_else(|| std::env::var("KEYTRAIL_API_TOKEN").ok().filter(|t| !t.is_empty())),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            match rt.block_on(keytrail_collector::cli::run(args)) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("keytrail-collector: {message}");
    ExitCode::FAILURE
}
