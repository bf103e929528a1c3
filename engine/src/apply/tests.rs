//! Tests of the apply rules (R5–R8, R10, R11, R13) against a real PostgreSQL.
