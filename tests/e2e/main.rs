//! End-to-end tests: real PostgreSQL clusters, real `branchsync` daemons.
//! Run them with `bash tests/run.sh` (builds the binary with failpoints).

mod bad_input;
mod big_transactions;
mod causal_order;
mod conflicts;
mod convergence;
mod crash;
mod ddl;
mod handshake;
mod offline;
mod pgbench;
mod random_convergence;
mod restore;
mod scenarios;
