//! What runs on the build machine. Each provisioner is one recorded step.

pub mod ansible;
pub mod connect;
pub mod file;
mod mask;
pub mod runner;
pub mod shell;
pub mod shell_local;

use std::collections::BTreeMap;

use crate::engine::StepContext;

/// Build facts every provisioner sees as `KILN_*` environment variables: who the
/// build is, plus every output earlier steps recorded (host, instance ID, region…).
pub fn build_facts(ctx: &StepContext) -> BTreeMap<String, String> {
    let f = &ctx.facts;
    let mut env = BTreeMap::new();
    for (k, v) in &ctx.outputs {
        if k == connect::OUT_KEY_SECRET {
            continue;
        }
        env.insert(format!("KILN_{}", env_name(k)), v.clone());
    }
    env.insert("KILN_BUILD_NAME".into(), f.name.clone());
    env.insert("KILN_BUILD_NAMESPACE".into(), f.namespace.clone());
    env.insert("KILN_BUILD_UID".into(), f.uid.clone());
    env.insert("KILN_BUILD_GENERATION".into(), f.generation.to_string());
    env.insert("KILN_BUILDER".into(), f.builder.to_string());
    env.insert(
        "KILN_USER".into(),
        ctx.spec.communicator.ssh.username.clone(),
    );
    env.insert("KILN_PORT".into(), connect::port(ctx).to_string());
    if let Some(l) = &f.lineage {
        env.insert("KILN_PIPELINE".into(), l.pipeline.clone());
        env.insert("KILN_PIPELINE_VERSION".into(), l.version.to_string());
    }
    env.insert("KILN_STEP".into(), ctx.step_name.clone());
    env
}

fn env_name(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// POSIX single-quoting: safe for any byte sequence except NUL.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME `x`"), "'$HOME `x`'");
    }

    #[test]
    fn env_names_are_shell_identifiers() {
        assert_eq!(env_name("instance_id"), "INSTANCE_ID");
        assert_eq!(env_name("source-ami"), "SOURCE_AMI");
    }
}
