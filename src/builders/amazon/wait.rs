//! Waiting for EC2 resources (an instance running or stopped, an image available):
//! few calls, and an end close to the resource's.
//!
//! A wait of a kind kiln has not seen yet in a region checks at once, then at
//! intervals that grow with the time waited (a fiftieth of it, from `pollInterval`
//! up to 4x). A wait of a kind it has seen sleeps through the typical duration (the
//! median of the last few) before its first check, then checks every hundredth of
//! that duration (at least 20 ms, at most `pollInterval`): a resource that takes as
//! long as the last ones costs one to three calls and is seen within 1% of its end.
//! Each wait adds its own estimate of when the resource got ready, so the typical
//! duration follows a region that gets slower or faster.

use std::collections::{HashMap, VecDeque};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::Waits;
use crate::engine::StepError;
use crate::sync::lock;

/// What a wait is for, and where: its learned durations are kept by this.
#[derive(Clone, Copy, Debug)]
pub struct Kind<'a> {
    pub name: &'static str,
    pub region: &'a str,
}

const KEPT: usize = 5;
/// The tail's interval is the typical duration over this: a build's waits add up
/// to its length, so 1% each keeps the build within about 1% of its resources.
const TAIL_DIVISOR: u32 = 100;
#[cfg(not(test))]
const TAIL_FLOOR: Duration = Duration::from_millis(20);
// The unit tests run on the real clock with durations of a few hundred ms.
#[cfg(test)]
const TAIL_FLOOR: Duration = Duration::from_millis(5);

type Learned = HashMap<(&'static str, String), VecDeque<Duration>>;
static LEARNED: LazyLock<Mutex<Learned>> = LazyLock::new(Mutex::default);

/// The typical duration of this kind of wait, if kiln has seen one.
fn typical(kind: Kind<'_>) -> Option<Duration> {
    let learned = lock(&LEARNED);
    let seen = learned.get(&(kind.name, kind.region.to_string()))?;
    let mut v: Vec<Duration> = seen.iter().copied().collect();
    v.sort();
    v.get(v.len() / 2).copied()
}

fn learn(kind: Kind<'_>, took: Duration) {
    let mut learned = lock(&LEARNED);
    let seen = learned
        .entry((kind.name, kind.region.to_string()))
        .or_default();
    if seen.len() == KEPT {
        seen.pop_front();
    }
    seen.push_back(took);
}

/// Polls `check` until it yields a value, within the budget. The task, not a
/// controller worker, does the waiting.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    kind: Kind<'_>,
    waits: &Waits,
    cancel: &tokio_util::sync::CancellationToken,
    mut check: F,
) -> Result<T, StepError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, StepError>>,
{
    let start = Instant::now();
    let typical = typical(kind);
    let tail = typical.map(|t| (t / TAIL_DIVISOR).clamp(TAIL_FLOOR, waits.poll.max(TAIL_FLOOR)));
    // The first check: at once, or at the end of the typical duration.
    let mut next = start + typical.unwrap_or_default();
    let mut last_check: Option<Instant> = None;
    loop {
        if next > start + waits.timeout {
            return Err(StepError::Failed(format!(
                "timed out after {:?} waiting for {what} (spec.builder.amazonEBS.waitTimeout)",
                waits.timeout
            )));
        }
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = cancel.cancelled() => return Err(StepError::Cancelled),
        }
        let at = Instant::now();
        if let Some(v) = check().await? {
            // The resource got ready between the last check without an answer and
            // this one: the middle is the estimate. Ready at a first check made at
            // the typical end, it may have been ready long before: the estimate
            // moves down by half a tail interval, so the first check comes a
            // little earlier next time until it finds the resource not ready.
            let waited = at - start;
            let estimate = match (last_check, tail) {
                (Some(before), _) => (before - start) + (at - before) / 2,
                (None, Some(tail)) => waited.saturating_sub(tail / 2),
                (None, None) => waited / 2,
            };
            learn(kind, estimate);
            return Ok(v);
        }
        last_check = Some(at);
        let delay = tail.unwrap_or_else(|| poll_delay(waits.poll, at - start));
        next = Instant::now() + delay;
    }
}

/// Without a typical duration: a fiftieth of the time waited, from `poll` up to 4x
/// `poll` (an hour-long copy does not poll every few seconds, and no wait oversleeps
/// its resource by more than about 2% of the time it took).
fn poll_delay(poll: Duration, waited: Duration) -> Duration {
    (waited / 50).clamp(poll, poll * 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waits() -> Waits {
        Waits {
            timeout: Duration::from_secs(60),
            poll: Duration::from_millis(200),
        }
    }

    /// A resource ready `after` the wait starts; counts the checks.
    async fn wait(kind: Kind<'_>, after: Duration) -> (u32, Duration) {
        let start = Instant::now();
        let calls = std::sync::atomic::AtomicU32::new(0);
        let cancel = tokio_util::sync::CancellationToken::new();
        wait_for("it", kind, &waits(), &cancel, || async {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok((start.elapsed() >= after).then_some(()))
        })
        .await
        .unwrap();
        (calls.into_inner(), start.elapsed())
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[tokio::test]
    async fn a_known_kind_of_wait_checks_at_its_typical_end_and_ends_close_to_it() {
        let kind = Kind {
            name: "test-known",
            region: "r1",
        };
        // Unknown: checks at 0, 200, 400 and 600 ms (pollInterval): 90 ms late.
        let (calls, took) = wait(kind, MS(510)).await;
        assert_eq!(calls, 4);
        assert!(took >= MS(600), "{took:?}");
        // Known (about 500 ms): the next waits check at the typical end, then
        // every hundredth of it; a few waits on they cost 1-3 calls and end within
        // a few percent (plus the timer's own lateness).
        let mut last = (0, Duration::ZERO);
        for _ in 0..6 {
            last = wait(kind, MS(500)).await;
        }
        let (calls, took) = last;
        assert!(calls <= 3, "{calls} calls");
        assert!(took <= MS(540), "{took:?} for a 500 ms resource");
        // Regions learn apart: another region's first wait checks at once.
        let other = Kind {
            name: "test-known",
            region: "r2",
        };
        let (calls, took) = wait(other, Duration::ZERO).await;
        assert_eq!(calls, 1);
        assert!(took < MS(50), "{took:?}");
    }

    #[tokio::test]
    async fn a_wait_that_gets_slower_is_followed() {
        let kind = Kind {
            name: "test-slower",
            region: "r1",
        };
        for _ in 0..5 {
            wait(kind, MS(200)).await;
        }
        // Now 400 ms: after the first check at ~200 ms it polls every 5 ms, and
        // after a few waits the first check has moved to the new duration.
        let (_, took) = wait(kind, MS(400)).await;
        assert!(took <= MS(440), "{took:?}");
        for _ in 0..4 {
            wait(kind, MS(400)).await;
        }
        let (calls, took) = wait(kind, MS(400)).await;
        assert!(calls <= 3 && took <= MS(440), "{calls} {took:?}");
    }

    #[test]
    fn polling_backs_off_with_the_time_waited() {
        let poll = Duration::from_secs(2);
        assert_eq!(poll_delay(poll, Duration::ZERO), poll);
        assert_eq!(
            poll_delay(poll, Duration::from_secs(150)),
            Duration::from_secs(3)
        );
        assert_eq!(
            poll_delay(poll, Duration::from_secs(3600)),
            Duration::from_secs(8)
        );
        let fast = Duration::from_millis(100);
        assert_eq!(
            poll_delay(fast, Duration::from_secs(5)),
            Duration::from_millis(100)
        );
        assert_eq!(
            poll_delay(fast, Duration::from_secs(10)),
            Duration::from_millis(200)
        );
    }
}
