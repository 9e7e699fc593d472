//! Ways of talking to a build machine.

pub mod pool;
pub mod ssh;
