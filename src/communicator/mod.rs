//! Ways of talking to a build machine.

pub mod ssh;
