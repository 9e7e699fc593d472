//! What a pipeline does next, decided from its spec, its status and what its
//! ImageBuilds show, and nothing else: pure, so that every rule is a unit test.
//!
//! The controller writes the status this returns before it performs any of the
//! actions, so a restarted operator sees every decision: a build decided is created
//! with the same name after a crash (never a second one), a removal decided is
//! retried until done.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::schedule::{Cron, time_zone};
use crate::api::{
    ArtifactPolicy, ArtifactRemoval, BuildPhase, CleanupPhase, ConcurrencyPolicy, FailureBrake,
    ImagePipelineSpec, ImagePipelineStatus, LatestImage, MAX_VERSIONS, PipelineBuild,
    PipelineVersion, SourceCheck, VersionImage, duration,
};

/// One of the pipeline's ImageBuilds as the controller sees it now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub name: String,
    pub uid: String,
    pub phase: Option<BuildPhase>,
    pub message: Option<String>,
    /// The images of its build, once it succeeded.
    pub images: Vec<VersionImage>,
    /// The image the build started from, as its artifacts record it.
    pub source_image: Option<String>,
    pub completed_at: Option<Time>,
    /// It is being deleted.
    pub deleting: bool,
}

pub struct Input<'a> {
    pub name: &'a str,
    pub generation: i64,
    pub created: Timestamp,
    pub spec: &'a ImagePipelineSpec,
    pub status: &'a ImagePipelineStatus,
    pub deleting: bool,
    /// The annotation `kiln.dev/resume`.
    pub resume: Option<&'a str>,
    /// Every ImageBuild the pipeline owns.
    pub builds: &'a [Observed],
    pub now: Timestamp,
    /// A look-up of the current source image made for this decision (`onSourceChange`).
    pub source: Option<Result<Option<String>, String>>,
    /// When the source is looked up next (kept in memory: a check that finds
    /// nothing new writes nothing).
    pub next_source_check: Option<Timestamp>,
    /// Why the template cannot be built (plan, policy), if it cannot.
    pub template_problem: Option<String>,
    /// Hash of the template as it is now.
    pub template_hash: &'a str,
    /// Secrets removing the versions' images reads (the template's credentials).
    pub secrets: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create this ImageBuild (already recorded in `status.builds`); one that exists
    /// and is the pipeline's counts as created.
    Create(PipelineBuild),
    /// Delete one of the pipeline's ImageBuilds (name, uid).
    Delete(String, String),
    /// Remove the images and snapshots of this version (by number); record the outcome.
    RemoveImages(i64),
    /// Write `outputConfigMap` with the latest pointer, then record `outputVersion`.
    WriteOutput,
    HoldSecrets(Vec<String>),
    ReleaseSecrets(Vec<String>),
    RemoveFinalizer,
    Event {
        warning: bool,
        reason: &'static str,
        /// What the event is about (`Build web-3`, `Retire version 2`): events of
        /// one reason and action fold into one with a count, so it must tell them apart.
        action: String,
        note: String,
    },
}

pub struct Decision {
    pub status: ImagePipelineStatus,
    pub actions: Vec<Action>,
    /// When to look again at the latest, without any change.
    pub wake_in: Option<Duration>,
}

/// When the schedule fires.
pub enum Timer {
    Cron(Box<Cron>, jiff::tz::TimeZone),
    /// Every period, counted from the anchor (the pipeline's creation).
    Every(Duration, Timestamp),
}

impl Timer {
    pub fn of(spec: &ImagePipelineSpec, created: Timestamp) -> Result<Option<Timer>, String> {
        let Some(s) = &spec.schedule else {
            return Ok(None);
        };
        match (&s.cron, &s.every) {
            (Some(expr), None) => {
                let cron = Cron::parse(expr).map_err(|e| format!("spec.schedule.cron: {e}"))?;
                let zone = s.time_zone.as_deref().unwrap_or("Etc/UTC");
                let tz = time_zone(zone).map_err(|e| format!("spec.schedule.timeZone: {e}"))?;
                Ok(Some(Timer::Cron(Box::new(cron), tz)))
            }
            (None, Some(every)) => {
                let period =
                    duration::parse(every).map_err(|e| format!("spec.schedule.every: {e}"))?;
                if period < Duration::from_secs(1) {
                    return Err(format!(
                        "spec.schedule.every: {every:?} is shorter than the shortest interval, 1s"
                    ));
                }
                Ok(Some(Timer::Every(period, created)))
            }
            _ => Err("spec.schedule: set exactly one of cron or every".into()),
        }
    }

    /// The first run strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        match self {
            Timer::Cron(cron, tz) => cron.next_after(t, tz),
            Timer::Every(period, anchor) => {
                let p = period.as_nanos() as i128;
                let since = t.as_nanosecond() - anchor.as_nanosecond();
                let k = if since < 0 { 1 } else { since / p + 1 };
                Timestamp::from_nanosecond(anchor.as_nanosecond() + k * p).ok()
            }
        }
    }

    /// The latest run `m` with `since < m <= now`: of several missed runs, only the
    /// last one counts.
    pub fn last_between(&self, since: Timestamp, now: Timestamp) -> Option<Timestamp> {
        match self {
            Timer::Cron(cron, tz) => cron.last_at_or_before(since, now, tz),
            Timer::Every(period, anchor) => {
                let p = period.as_nanos() as i128;
                let k = (now.as_nanosecond() - anchor.as_nanosecond()).div_euclid(p);
                if k < 1 {
                    return None;
                }
                let m = Timestamp::from_nanosecond(anchor.as_nanosecond() + k * p).ok()?;
                (m > since).then_some(m)
            }
        }
    }
}

/// Why a build ran, in status and on the ImageBuild.
pub const TEMPLATE: &str = "template";
pub const SCHEDULE: &str = "schedule";
pub const SOURCE: &str = "source";

pub fn decide(input: &Input) -> Decision {
    let mut d = Decider {
        input,
        st: input.status.clone(),
        actions: Vec::new(),
        wake: Vec::new(),
    };
    d.follow_builds();
    d.brake();
    let timer = if input.deleting {
        Ok(None)
    } else {
        Timer::of(input.spec, input.created)
    };
    let problem = match (&timer, &input.template_problem) {
        (Err(e), _) => Some(e.clone()),
        (_, Some(p)) => Some(p.clone()),
        _ => None,
    };
    if input.deleting {
        d.delete();
    } else {
        d.trigger(timer.ok().flatten(), problem.is_some());
    }
    d.retire();
    d.latest();
    d.history();
    d.secrets();
    d.conditions(problem);
    let wake_in = d
        .wake
        .iter()
        .min()
        .map(|t| Duration::try_from(t.duration_since(input.now)).unwrap_or(Duration::ZERO));
    Decision {
        status: d.st,
        actions: d.actions,
        wake_in,
    }
}

struct Decider<'a> {
    input: &'a Input<'a>,
    st: ImagePipelineStatus,
    actions: Vec<Action>,
    wake: Vec<Timestamp>,
}

impl Decider<'_> {
    fn observed(&self, b: &PipelineBuild) -> Option<&Observed> {
        self.input
            .builds
            .iter()
            .find(|o| o.name == b.name && b.uid.as_ref().is_none_or(|u| *u == o.uid))
    }

    fn event(&mut self, warning: bool, reason: &'static str, action: String, note: String) {
        self.actions.push(Action::Event {
            warning,
            reason,
            action,
            note,
        });
    }

    /// Folds what each unsettled build shows into status: a success becomes a
    /// version, a failure counts towards the brake. A build decided but not seen is
    /// created (again: the create is idempotent by name).
    fn follow_builds(&mut self) {
        let now = Time(self.input.now);
        let mut builds = std::mem::take(&mut self.st.builds);
        for b in builds.iter_mut().filter(|b| !b.settled) {
            match self.observed(b).cloned() {
                Some(o) => {
                    b.uid = Some(o.uid.clone());
                    b.phase = o.phase;
                    match o.phase {
                        Some(BuildPhase::Succeeded) => {
                            b.settled = true;
                            b.message = None;
                            self.st.consecutive_failures = 0;
                            if b.template_hash.is_some()
                                && self.st.failed_template == b.template_hash
                            {
                                self.st.failed_template = None;
                            }
                            let v = PipelineVersion {
                                version: b.sequence,
                                build: b.name.clone(),
                                build_uid: o.uid.clone(),
                                trigger: b.trigger.clone(),
                                source_image: o.source_image.clone().or(b.source_image.clone()),
                                template_hash: b.template_hash.clone(),
                                images: o.images.clone(),
                                created_at: o.completed_at.clone().or(Some(now.clone())),
                                retired: false,
                                removal: None,
                            };
                            let images: Vec<String> =
                                v.images.iter().map(|i| i.image_id.clone()).collect();
                            self.event(
                                false,
                                "VersionCreated",
                                format!("Build {}", b.name),
                                format!(
                                    "version {} from ImageBuild {}: {}",
                                    v.version,
                                    b.name,
                                    images.join(", ")
                                ),
                            );
                            self.st.versions.push(v);
                            self.st.versions.sort_by_key(|v| v.version);
                        }
                        Some(BuildPhase::Failed) => {
                            b.settled = true;
                            b.message = o.message.clone();
                            self.st.consecutive_failures += 1;
                            if b.template_hash.as_deref() == Some(self.input.template_hash)
                                && !self.template_has_a_version()
                            {
                                self.st.failed_template = b.template_hash.clone();
                            }
                            self.event(
                                true,
                                "BuildFailed",
                                format!("Build {}", b.name),
                                format!(
                                    "ImageBuild {} failed ({} in a row): {}",
                                    b.name,
                                    self.st.consecutive_failures,
                                    o.message.as_deref().unwrap_or("no message")
                                ),
                            );
                        }
                        _ => {}
                    }
                }
                None if b.uid.is_some() => {
                    // Deleted before it finished, by someone else or by `Replace`:
                    // not a failure of the template.
                    b.settled = true;
                    if b.message.is_none() {
                        b.message = Some("deleted before it finished".into());
                    }
                }
                None if !self.input.deleting => self.actions.push(Action::Create(b.clone())),
                None => {
                    b.settled = true;
                    b.message = Some("not created: the pipeline is being deleted".into());
                }
            }
        }
        self.st.builds = builds;
    }

    /// Whether the current template made a version.
    fn template_has_a_version(&self) -> bool {
        self.st
            .versions
            .iter()
            .any(|v| v.template_hash.as_deref() == Some(self.input.template_hash))
    }

    /// Stops triggering after too many failures in a row; a new generation or a new
    /// value of `kiln.dev/resume` re-arms it.
    fn brake(&mut self) {
        let resume = self.input.resume.map(str::to_string);
        if let Some(b) = &self.st.brake
            && (b.generation != self.input.generation || b.resume != resume)
        {
            self.st.brake = None;
            self.st.consecutive_failures = 0;
            self.event(
                false,
                "Resumed",
                "Release the failure brake".into(),
                "the failure brake is released; the pipeline starts builds again".into(),
            );
        }
        let max = self.input.spec.max_consecutive_failures;
        if self.st.brake.is_none() && max > 0 && self.st.consecutive_failures >= max {
            self.st.brake = Some(FailureBrake {
                since: Time(self.input.now),
                generation: self.input.generation,
                resume,
            });
            self.event(
                true,
                "FailureBrake",
                "Stop starting builds".into(),
                format!(
                    "{} builds failed in a row (maxConsecutiveFailures: {max}); no new builds until the spec or the annotation {} changes",
                    self.st.consecutive_failures,
                    crate::api::RESUME_ANNOTATION
                ),
            );
        }
    }

    fn active(&self) -> Vec<&PipelineBuild> {
        self.st.builds.iter().filter(|b| !b.settled).collect()
    }

    fn trigger(&mut self, timer: Option<Timer>, broken: bool) {
        let spec = self.input.spec;
        let now = self.input.now;
        let mut due: Vec<&'static str> = Vec::new();
        let mut source = None;

        // The schedule advances whether or not it may build (suspended, braked,
        // Forbid): a run that cannot start is skipped, not queued.
        match &timer {
            Some(timer) => {
                let since = self
                    .st
                    .last_schedule_time
                    .as_ref()
                    .map_or(self.input.created, |t| t.0);
                if let Some(missed) = timer.last_between(since, now) {
                    self.st.last_schedule_time = Some(Time(missed));
                    let late = Duration::try_from(now.duration_since(missed)).unwrap_or_default();
                    let deadline = spec
                        .starting_deadline
                        .as_deref()
                        .and_then(|d| duration::parse(d).ok());
                    match deadline {
                        Some(d) if late > d => self.event(
                            true,
                            "MissedSchedule",
                            format!("Skip the run of {missed}"),
                            format!(
                                "the run of {missed} is {}s late, past startingDeadline {}; skipped",
                                late.as_secs(),
                                spec.starting_deadline.as_deref().unwrap_or_default()
                            ),
                        ),
                        _ => due.push(SCHEDULE),
                    }
                }
                self.st.next_run_at = timer.next_after(now).map(Time);
                if let Some(t) = &self.st.next_run_at {
                    self.wake.push(t.0);
                }
            }
            None => self.st.next_run_at = None,
        }

        if let Some(lookup) = &self.input.source {
            let known = self.st.source.as_ref().and_then(|s| s.image.clone());
            let message = self.st.source.as_ref().and_then(|s| s.message.clone());
            match lookup {
                Ok(image) if *image != known || message.is_some() => {
                    let (since, built) = match &self.st.source {
                        Some(s) if s.image == *image => (s.since.clone(), s.built),
                        _ => (Time(now), false),
                    };
                    self.st.source = Some(SourceCheck {
                        image: image.clone(),
                        since,
                        built,
                        message: None,
                    });
                }
                Ok(_) => {}
                // Keep the last known image: a failed look-up is no change.
                Err(e) => {
                    if message.as_ref() != Some(e) {
                        self.event(
                            true,
                            "SourceCheckFailed",
                            "Look up the source image".into(),
                            format!("looking up the source image: {e}"),
                        );
                    }
                    let (since, built) = self
                        .st
                        .source
                        .as_ref()
                        .map_or((Time(now), false), |s| (s.since.clone(), s.built));
                    self.st.source = Some(SourceCheck {
                        image: known,
                        since,
                        built,
                        message: Some(e.clone()),
                    });
                }
            }
        }
        if spec.on_source_change.is_some()
            && let Some(at) = self.input.next_source_check
        {
            self.wake.push(at);
        }
        if spec.on_source_change.is_some()
            && let Some(image) = self.st.source.as_ref().and_then(|c| c.image.as_ref())
        {
            source = Some(image.clone());
            let built = self
                .st
                .versions
                .iter()
                .rev()
                .find(|v| !v.retired)
                .and_then(|v| v.source_image.as_ref());
            let tried = self.st.source.as_ref().is_some_and(|c| c.built);
            if built.is_some_and(|b| b != image) && !tried {
                due.push(SOURCE);
            }
        }
        if self.st.template_hash.as_deref() != Some(self.input.template_hash) {
            due.push(TEMPLATE);
        }

        if spec.suspend || self.st.brake.is_some() || broken || due.is_empty() {
            return;
        }
        let active: Vec<PipelineBuild> = self.active().into_iter().cloned().collect();
        if !active.is_empty() {
            match spec.concurrency_policy {
                ConcurrencyPolicy::Forbid => {
                    if due.contains(&SCHEDULE) {
                        self.event(
                            false,
                            "ScheduleSkipped",
                            format!("Skip a run while {} runs", active[0].name),
                            format!(
                                "a scheduled run was skipped: ImageBuild {} is still running (concurrencyPolicy: Forbid)",
                                active[0].name
                            ),
                        );
                    }
                    // A changed template or source is still there when the build
                    // finishes: it starts the next build then.
                    return;
                }
                ConcurrencyPolicy::Replace => {
                    for b in &active {
                        if let Some(uid) = &b.uid {
                            self.actions
                                .push(Action::Delete(b.name.clone(), uid.clone()));
                        }
                    }
                    let replaced_by = self.st.sequence + 1;
                    for b in self.st.builds.iter_mut().filter(|b| !b.settled) {
                        b.settled = true;
                        b.message = Some(format!(
                            "replaced by build {replaced_by} (concurrencyPolicy: Replace)"
                        ));
                    }
                    // Creates already decided for them are moot.
                    self.actions
                        .retain(|a| !matches!(a, Action::Create(b) if active.iter().any(|x| x.name == b.name)));
                }
            }
        }
        self.st.sequence += 1;
        let b = PipelineBuild {
            name: format!("{}-{}", self.input.name, self.st.sequence),
            sequence: self.st.sequence,
            trigger: due.join(","),
            source_image: source,
            template_hash: Some(self.input.template_hash.to_string()),
            decided_at: Time(now),
            uid: None,
            phase: None,
            settled: false,
            message: None,
        };
        self.st.template_hash = Some(self.input.template_hash.to_string());
        if let Some(check) = &mut self.st.source
            && check.image.is_some()
            && check.image == b.source_image
        {
            check.built = true;
        }
        self.event(
            false,
            "BuildStarted",
            format!("Build {}", b.name),
            format!("ImageBuild {} ({})", b.name, b.trigger),
        );
        self.actions.push(Action::Create(b.clone()));
        self.st.builds.push(b);
    }

    /// Versions beyond `imageRetention.keep` (never the latest or the pinned one)
    /// are retired; a retired version's ImageBuild is deleted first (so that no
    /// ImageBuild lists a removed image), then its images are removed.
    fn retire(&mut self) {
        let keep = self
            .input
            .spec
            .image_retention
            .as_ref()
            .map(|r| r.keep as usize);
        let deleting_all =
            self.input.deleting && self.input.spec.artifact_policy == ArtifactPolicy::Delete;
        if let Some(keep) = keep {
            let pinned = self.input.spec.pinned_version;
            let newest = self.st.versions.iter().map(|v| v.version).max();
            let live: Vec<i64> = self
                .st
                .versions
                .iter()
                .filter(|v| !v.retired)
                .map(|v| v.version)
                .collect();
            let kept: Vec<i64> = live.iter().rev().take(keep).copied().collect();
            for v in self.st.versions.iter_mut().filter(|v| !v.retired) {
                let protected = Some(v.version) == pinned || Some(v.version) == newest;
                if deleting_all || (!kept.contains(&v.version) && !protected) {
                    v.retired = true;
                    v.removal = Some(ArtifactRemoval {
                        phase: CleanupPhase::Pending,
                        ..Default::default()
                    });
                }
            }
        }
        let now = self.input.now;
        let mut events = Vec::new();
        for v in self
            .st
            .versions
            .iter()
            .filter(|v| v.retired && !v.removed())
        {
            let build = self
                .input
                .builds
                .iter()
                .find(|o| o.name == v.build && o.uid == v.build_uid);
            match build {
                Some(o) if !o.deleting => self
                    .actions
                    .push(Action::Delete(o.name.clone(), o.uid.clone())),
                Some(_) => {}
                None => match v.removal.as_ref().and_then(|r| r.retry_at.as_ref()) {
                    Some(at) if at.0 > now => self.wake.push(at.0),
                    _ => {
                        if v.removal.as_ref().is_none_or(|r| r.attempts == 0) {
                            events.push((
                                v.version,
                                format!(
                                    "removing the images of version {}: {}",
                                    v.version,
                                    v.images
                                        .iter()
                                        .map(|i| i.image_id.as_str())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                            ));
                        }
                        self.actions.push(Action::RemoveImages(v.version));
                    }
                },
            }
        }
        for (version, note) in events {
            self.event(
                false,
                "RetiringVersion",
                format!("Retire version {version}"),
                note,
            );
        }
        // Bounded: versions whose images are gone go first, oldest first.
        while self.st.versions.len() > MAX_VERSIONS {
            match self.st.versions.iter().position(|v| v.removed()) {
                Some(i) => {
                    self.st.versions.remove(i);
                }
                None if self.input.spec.image_retention.is_none() => {
                    // Without retention, images are kept and no longer tracked.
                    self.st.versions.remove(0);
                }
                None => break,
            }
        }
    }

    /// The latest pointer: the pinned version, or the newest.
    fn latest(&mut self) {
        let pinned = self.input.spec.pinned_version;
        let target = match pinned {
            Some(p) => self
                .st
                .versions
                .iter()
                .find(|v| v.version == p && !v.retired),
            None => self.st.versions.iter().rev().find(|v| !v.retired),
        };
        let Some(v) = target.cloned() else {
            if pinned.is_none() {
                self.st.latest_version = None;
                self.st.latest.clear();
            }
            return;
        };
        self.st.latest_version = Some(v.version);
        self.st.latest = v
            .images
            .iter()
            .map(|i| LatestImage {
                region: i.region.clone(),
                image_id: i.image_id.clone(),
            })
            .collect();
        if let Some(cm) = &self.input.spec.output_config_map
            && (self.st.output_version != Some(v.version)
                || self.st.output_config_map.as_ref() != Some(&cm.name))
            && !self.input.deleting
        {
            self.actions.push(Action::WriteOutput);
        }
    }

    /// Keeps the newest finished ImageBuilds up to the limits; deletes the others.
    /// An entry stays until its object is gone.
    fn history(&mut self) {
        let limits = &self.input.spec.build_history_limit;
        let mut succeeded = 0;
        let mut failed = 0;
        let mut drop = Vec::new();
        for (i, b) in self.st.builds.iter().enumerate().rev() {
            if !b.settled {
                continue;
            }
            let over = if b.phase == Some(BuildPhase::Succeeded) {
                succeeded += 1;
                succeeded > limits.succeeded
            } else {
                failed += 1;
                failed > limits.failed
            };
            if !over {
                continue;
            }
            match self.observed(b) {
                Some(o) if !o.deleting => {
                    let delete = Action::Delete(o.name.clone(), o.uid.clone());
                    if !self.actions.contains(&delete) {
                        self.actions.push(delete);
                    }
                }
                Some(_) => {}
                None => drop.push(i),
            }
        }
        for i in drop {
            self.st.builds.remove(i);
        }
    }

    /// Holds the credentials Secrets while there are images the pipeline may have
    /// to remove: a Secret deleted with the pipeline (a namespace deletion) waits.
    fn secrets(&mut self) {
        let may_remove = self.st.versions.iter().any(|v| v.retired && !v.removed())
            || (self.input.spec.artifact_policy == ArtifactPolicy::Delete
                && self.st.versions.iter().any(|v| !v.removed()));
        let wanted: Vec<String> = if may_remove {
            self.input.secrets.clone()
        } else {
            Vec::new()
        };
        let release: Vec<String> = self
            .st
            .held_secrets
            .iter()
            .filter(|s| !wanted.contains(s))
            .cloned()
            .collect();
        let hold: Vec<String> = wanted
            .iter()
            .filter(|s| !self.st.held_secrets.contains(s))
            .cloned()
            .collect();
        if !hold.is_empty() {
            self.actions.push(Action::HoldSecrets(wanted.clone()));
        }
        if !release.is_empty() {
            self.actions.push(Action::ReleaseSecrets(release));
        }
        self.st.held_secrets = wanted;
    }

    /// On deletion: with `artifactPolicy: Delete` the ImageBuilds go first, then
    /// every version's images; the finalizer is released when nothing is left.
    fn delete(&mut self) {
        self.st.next_run_at = None;
        if self.input.spec.artifact_policy == ArtifactPolicy::Delete {
            for o in self.input.builds.iter().filter(|o| !o.deleting) {
                self.actions
                    .push(Action::Delete(o.name.clone(), o.uid.clone()));
            }
        }
    }

    fn conditions(&mut self, problem: Option<String>) {
        let g = self.input.generation;
        let now = Time(self.input.now);
        let active = self.active().first().map(|b| (*b).clone());
        let deleting = self.input.deleting;
        if deleting {
            let left = self
                .st
                .versions
                .iter()
                .filter(|v| v.retired && !v.removed())
                .count();
            let builds = self.input.builds.len();
            // A removal retention already decided is finished first, whatever the
            // policy: those images were dropped, and nothing would remove them later.
            let release = left == 0
                && (self.input.spec.artifact_policy == ArtifactPolicy::Retain || builds == 0);
            if release {
                self.st.message = Some("deleted; finalizer released".into());
                if !self
                    .actions
                    .iter()
                    .any(|a| matches!(a, Action::ReleaseSecrets(_)))
                    && !self.st.held_secrets.is_empty()
                {
                    self.actions
                        .push(Action::ReleaseSecrets(self.st.held_secrets.clone()));
                    self.st.held_secrets.clear();
                }
                self.actions.push(Action::RemoveFinalizer);
            } else {
                self.st.message = Some(format!(
                    "deleting: {builds} ImageBuilds and the images of {left} versions left to remove"
                ));
            }
        }
        let pinned_missing = self.input.spec.pinned_version.filter(|p| {
            !self
                .st
                .versions
                .iter()
                .any(|v| v.version == *p && !v.retired)
        });
        // The current template's last build failed and it has no version: the
        // pipeline does not have what its spec asks for.
        let failed_template = (self.st.failed_template.as_deref()
            == Some(self.input.template_hash)
            && active.is_none())
        .then(|| {
            self.st
                .builds
                .iter()
                .rev()
                .find(|b| b.template_hash.as_deref() == Some(self.input.template_hash))
                .map_or_else(
                    || "its last build".to_string(),
                    |b| {
                        format!(
                            "ImageBuild {} ({})",
                            b.name,
                            b.message.as_deref().unwrap_or("no message")
                        )
                    },
                )
        });
        let (stalled, stalled_reason, stalled_message) = if let Some(p) = &problem {
            (true, "InvalidSpec", p.clone())
        } else if self.st.brake.is_some() {
            (
                true,
                "FailureBrake",
                format!(
                    "{} builds failed in a row (maxConsecutiveFailures: {}); change the spec or the annotation {} to resume",
                    self.st.consecutive_failures,
                    self.input.spec.max_consecutive_failures,
                    crate::api::RESUME_ANNOTATION
                ),
            )
        } else if let Some(what) = &failed_template {
            (
                true,
                "TemplateBuildFailed",
                format!(
                    "the current template has no version: {what} failed; the schedule, a newer source image or a change of the template tries again"
                ),
            )
        } else if let Some(p) = pinned_missing {
            (
                true,
                "PinnedVersionUnknown",
                format!(
                    "spec.pinnedVersion: {p} is not a version of this pipeline with images (versions: {})",
                    self.st
                        .versions
                        .iter()
                        .filter(|v| !v.retired)
                        .map(|v| v.version.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        } else {
            (
                false,
                "Triggering",
                "the pipeline starts builds when a trigger fires".into(),
            )
        };
        // Realizing the current template is reconciling; a scheduled rebuild of an
        // unchanged template is not (the pipeline is as asked).
        let reconciling = active.as_ref().filter(|b| {
            b.trigger.split(',').any(|t| t == TEMPLATE) || self.st.latest_version.is_none()
        });
        // A changed template not built yet (waiting for a running build) is
        // reconciling too; not while suspended, which would never end.
        let template_waits = self.st.template_hash.as_deref() != Some(self.input.template_hash)
            && !self.input.spec.suspend;
        let (ready, ready_reason, ready_message) = if stalled {
            (false, stalled_reason, stalled_message.clone())
        } else if let Some(v) = self.st.latest_version {
            (
                true,
                "VersionAvailable",
                format!("version {v} is the latest"),
            )
        } else if let Some(b) = &active {
            (
                false,
                "Building",
                format!("ImageBuild {} is running", b.name),
            )
        } else if self.input.spec.suspend {
            (
                false,
                "Suspended",
                "suspended before its first version".into(),
            )
        } else {
            (false, "NoVersion", "no build has succeeded yet".into())
        };
        if !deleting {
            self.st.message = Some(if stalled {
                stalled_message.clone()
            } else if let Some(b) = &active {
                format!("ImageBuild {} is running ({})", b.name, b.trigger)
            } else if self.input.spec.suspend {
                "suspended".into()
            } else {
                ready_message.clone()
            });
        }
        let mut set = |type_: &str, status: bool, reason: &str, message: String| {
            let status = if status { "True" } else { "False" }.to_string();
            match self.st.conditions.iter_mut().find(|c| c.type_ == type_) {
                Some(c) if c.status == status && c.reason == reason && c.message == message => {
                    c.observed_generation = Some(g);
                }
                Some(c) => {
                    if c.status != status {
                        c.last_transition_time = now.clone();
                    }
                    c.status = status;
                    c.reason = reason.to_string();
                    c.message = message;
                    c.observed_generation = Some(g);
                }
                None => self.st.conditions.push(Condition {
                    type_: type_.to_string(),
                    status,
                    reason: reason.to_string(),
                    message,
                    observed_generation: Some(g),
                    last_transition_time: now.clone(),
                }),
            }
        };
        set("Ready", ready, ready_reason, ready_message);
        match &reconciling {
            Some(b) if !stalled => set(
                "Reconciling",
                true,
                "Building",
                format!("ImageBuild {} builds the current template", b.name),
            ),
            _ if template_waits && !stalled => set(
                "Reconciling",
                true,
                "TemplateChanged",
                "the changed template is built when the running build finishes".into(),
            ),
            _ => set(
                "Reconciling",
                false,
                "Idle",
                "no build of a new template is running".into(),
            ),
        }
        set("Stalled", stalled, stalled_reason, stalled_message);
        self.st.observed_generation = Some(g);
    }
}

#[cfg(test)]
mod tests;
