//! keytrail-common: what the agent and the collector share — the event model and its
//! validation, key fingerprinting, the wire codec, TLS helpers and config value syntaxes.

pub mod body;
pub mod config;
pub mod disk;
pub mod event;
pub mod fingerprint;
pub mod logging;
pub mod pki;
pub mod prom;
pub mod serve;
pub mod time;
pub mod tls;
pub mod wire;
