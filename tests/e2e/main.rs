//! End-to-end tests: real PostgreSQL clusters, real `branchsync` daemons.
//! Run them with `bash tests/run.sh` (builds the binary with failpoints).

mod apply_rights;
mod backlog;
mod bad_entries;
mod bad_input;
mod big_transactions;
mod big_values;
mod causal_order;
mod conflicts;
mod convergence;
mod crash;
mod disk_full;
mod echoes;
mod ddl;
mod forged_marks;
mod handshake;
mod http;
mod join;
mod long_transaction;
mod lost_state;
mod numbering;
mod offline;
mod pg_restart;
mod pgbench;
mod progress;
mod random_convergence;
mod reload;
mod restore;
mod scenarios;
mod soak;
mod tls;
mod tryton;
mod verify;
mod web;
