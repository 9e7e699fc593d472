//! An amazon-ebs test's fixture: its namespace and operator, the EC2 test server,
//! and a source image of its own.

use aws_sdk_ec2::types::Image;
use kube::ResourceExt;
use serde_json::Value;

use super::{Ec2Server, Fixture};

pub struct Aws {
    pub f: Fixture,
    pub ec2: Ec2Server,
    pub source_ami: String,
}

impl Aws {
    /// The EC2 server's faults and delays are cleared: they are global, so the tests
    /// that set them take turns (each file with a lock of its own).
    pub async fn new(prefix: &str) -> Aws {
        let f = Fixture::new(prefix).await;
        let ec2 = Ec2Server::from_env(&f.env);
        ec2.control("DELETE", "/_kiln/faults", None);
        ec2.control("DELETE", "/_kiln/delays", None);
        let source_ami = super::aws_setup(&f, &ec2).await;
        Aws { f, ec2, source_ami }
    }

    pub fn build(&self, name: &str, ebs: Value, provisioners: Value) -> Value {
        super::ebs_build(
            &self.f,
            &self.ec2,
            &self.source_ami,
            name,
            ebs,
            provisioners,
        )
    }

    pub async fn uid(&self, name: &str) -> String {
        self.f.api().get(name).await.unwrap().uid().unwrap()
    }

    /// Everything kiln may have made for the build and not removed (see
    /// [`super::leaks`]).
    pub async fn leaks(&self, uid: &str, regions: &[&str]) -> Vec<String> {
        super::leaks(&self.ec2, &self.f.client, &self.f.ns, uid, regions).await
    }

    /// This build's images (by its tag) in `region`.
    pub async fn images(&self, uid: &str, region: &str) -> Vec<Image> {
        let c = self.ec2.client(region).await;
        c.describe_images()
            .owners("self")
            .filters(super::tag_filter(uid))
            .send()
            .await
            .unwrap()
            .images()
            .to_vec()
    }

    /// Adds a fault to the EC2 server (see tests/ec2server/README.md).
    pub fn fault(&self, fault: Value) {
        self.ec2.control("POST", "/_kiln/faults", Some(fault));
    }
}
