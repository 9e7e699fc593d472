//! The CRD's duration rule and kiln's duration parser are one grammar: every value
//! the real apiserver admits parses in the operator, and every value it refuses does
//! not (review A3: a `waitTimeout` the apiserver admitted but the parser refused
//! failed the build after its instance was launched, and blocked that instance's
//! cleanup for ever).

mod common;

use common::Fixture;
use kiln::api::duration;
use kube::api::{DynamicObject, PostParams};
use serde_json::{Value, json};

/// Values at the edges of the grammar, and random ones from a seeded generator.
fn candidates() -> Vec<String> {
    let mut v: Vec<String> = [
        "90s",
        "1h30m",
        "250ms",
        "0s",
        "999999999h",
        "1000000000s",
        "4294967295s",
        "4294967296s",
        "5000000000s",
        "99999999999999999999s",
        "000000001s",
        "0000000001s",
        "999999999h999999999h999999999h9h",
        "1h1h1h1h1h1h1h1h1h1h1h1h1h1h1h1h",
        "10",
        "m",
        "1.5h",
        "-1s",
        "10d",
        "1h30",
        "",
        "5 m",
        "1ms1s",
        "1mss",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    // xorshift: reproducible without a dependency.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let units = ["ms", "s", "m", "h", "", "d", "x"];
    for _ in 0..120 {
        let parts = 1 + next() % 4;
        let mut s = String::new();
        for _ in 0..parts {
            let digits = 1 + next() % 12;
            for _ in 0..digits {
                s.push(char::from(b'0' + (next() % 10) as u8));
            }
            s.push_str(units[(next() % units.len() as u64) as usize]);
        }
        if s.len() <= 32 {
            v.push(s);
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn every_duration_the_apiserver_admits_parses_and_no_other() {
    let f = Fixture::new("durations").await;
    let ar = kube::core::ApiResource::erase::<kiln::api::ImageBuild>(&());
    let api: kube::Api<DynamicObject> = kube::Api::namespaced_with(f.client.clone(), &f.ns, &ar);
    let mut disagree = Vec::new();
    let (mut admitted, mut refused) = (0, 0);
    for (i, d) in candidates().into_iter().enumerate() {
        // Every duration field of the spec has the same rule; `waitTimeout` is the
        // one whose late failure leaked an instance.
        let mut b: Value = f.null_build(&format!("d{i}"), json!([]));
        b["spec"]["builder"] = json!({"amazonEBS": {
            "region": "us-east-1", "sourceAMI": "ami-0123", "instanceType": "t3.micro",
            "amiName": "web", "waitTimeout": d, "pollInterval": d,
        }});
        b["spec"]["communicator"]["ssh"]["timeout"] = json!(d);
        b["spec"]["communicator"]["ssh"]["keepaliveInterval"] = json!(d);
        let o: DynamicObject = serde_json::from_value(b).unwrap();
        let pp = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let apiserver = api.create(&pp, &o).await.is_ok();
        let parser = duration::parse(&d).is_ok();
        if apiserver {
            admitted += 1;
        } else {
            refused += 1;
        }
        if apiserver != parser {
            disagree.push(format!(
                "{d:?}: apiserver admits {apiserver}, parser {parser}"
            ));
        }
    }
    println!("FIGURES: durations admitted {admitted}, refused {refused}");
    assert!(admitted > 10 && refused > 10, "{admitted} {refused}");
    assert!(disagree.is_empty(), "{disagree:#?}");
}
