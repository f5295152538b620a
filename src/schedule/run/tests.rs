//! The loop in paused time: [`TokioClock`] turns tokio's paused clock into wall time, so days of
//! schedule pass in milliseconds and every start can be checked to the second.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{TimeDelta, TimeZone};
use chrono_tz::Tz;

use super::*;
use crate::schedule::log::{MemoryRunLog, RunId, RunLogError, RunRecord, RunState};
use crate::schedule::{JobKind, TokioClock};

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
}

fn job(name: &str, cron: &str, tz: Tz) -> Job {
    Job::new(name, cron, tz, JobKind::Prune { from: None }).unwrap()
}

/// How the test runner behaves.
#[derive(Clone, Default)]
struct Behaviour {
    takes: Duration,
    fails_with: Option<String>,
    panics: bool,
}

/// Records when each job started and how many runs overlapped.
struct TestRunner {
    clock: TokioClock,
    behaviour: Behaviour,
    starts: Mutex<Vec<(String, DateTime<Utc>)>>,
    /// Per job: (running now, most ever running at once).
    active: Mutex<HashMap<String, (usize, usize)>>,
    /// All jobs: (running now, most ever running at once).
    total: Mutex<(usize, usize)>,
}

impl TestRunner {
    fn starts(&self, job: &str) -> Vec<DateTime<Utc>> {
        let starts = self.starts.lock().unwrap();
        starts
            .iter()
            .filter(|(j, _)| j == job)
            .map(|(_, t)| *t)
            .collect()
    }

    fn most_at_once(&self, job: &str) -> usize {
        self.active.lock().unwrap().get(job).map_or(0, |a| a.1)
    }

    fn enter(&self, job: &str) {
        let mut active = self.active.lock().unwrap();
        let a = active.entry(job.to_string()).or_default();
        a.0 += 1;
        a.1 = a.1.max(a.0);
        let mut total = self.total.lock().unwrap();
        total.0 += 1;
        total.1 = total.1.max(total.0);
    }

    fn leave(&self, job: &str) {
        self.active.lock().unwrap().get_mut(job).unwrap().0 -= 1;
        self.total.lock().unwrap().0 -= 1;
    }
}

impl JobRunner for TestRunner {
    fn run<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<JobOutcome, String>> {
        Box::pin(async move {
            self.starts
                .lock()
                .unwrap()
                .push((job.name.clone(), self.clock.now()));
            self.enter(&job.name);
            tokio::time::sleep(self.behaviour.takes).await;
            self.leave(&job.name);
            if self.behaviour.panics {
                panic!("boom");
            }
            match &self.behaviour.fails_with {
                Some(e) => Err(e.clone()),
                None => Ok(JobOutcome {
                    bytes: Some(1024),
                    detail: format!("{} done", job.name),
                }),
            }
        })
    }
}

/// `run_schedules` started at wall time `start`, in paused time.
struct Harness {
    runner: Arc<TestRunner>,
    log: Arc<dyn RunLog>,
    memory: Option<Arc<MemoryRunLog>>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn start(jobs: Vec<Job>, start: DateTime<Utc>, behaviour: Behaviour) -> Harness {
        let memory = Arc::new(MemoryRunLog::new());
        Harness::with_log(jobs, start, behaviour, memory.clone(), Some(memory))
    }

    fn with_history(
        jobs: Vec<Job>,
        start: DateTime<Utc>,
        behaviour: Behaviour,
        history: Vec<RunRecord>,
    ) -> Harness {
        let memory = Arc::new(MemoryRunLog::with_runs(history));
        Harness::with_log(jobs, start, behaviour, memory.clone(), Some(memory))
    }

    fn with_log(
        jobs: Vec<Job>,
        start: DateTime<Utc>,
        behaviour: Behaviour,
        log: Arc<dyn RunLog>,
        memory: Option<Arc<MemoryRunLog>>,
    ) -> Harness {
        let clock = TokioClock::starting_at(start);
        let runner = Arc::new(TestRunner {
            clock,
            behaviour,
            starts: Mutex::default(),
            active: Mutex::default(),
            total: Mutex::default(),
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run_schedules(
            jobs,
            runner.clone(),
            log.clone(),
            Arc::new(clock),
            cancel.clone(),
        ));
        Harness {
            runner,
            log,
            memory,
            cancel,
            task,
        }
    }

    /// Lets `hours` of wall time pass.
    async fn pass(&self, hours: f64) {
        tokio::time::sleep(Duration::from_secs_f64(hours * 3600.0)).await;
    }

    /// Cancels and waits for `run_schedules` to return.
    async fn stop(self) -> (Arc<TestRunner>, Vec<RunRecord>) {
        self.cancel.cancel();
        self.task.await.expect("run_schedules does not panic");
        let runs = self.memory.map(|m| m.runs()).unwrap_or_default();
        drop(self.log);
        (self.runner, runs)
    }
}

fn history(job: &str, started: DateTime<Utc>) -> RunRecord {
    RunRecord {
        id: RunId(1),
        job: job.to_string(),
        started_at: started,
        finished_at: Some(started + TimeDelta::minutes(5)),
        state: RunState::Ok,
        bytes: None,
        detail: None,
    }
}

#[tokio::test(start_paused = true)]
async fn each_fire_time_runs_the_job_at_that_instant_and_records_it() {
    let h = Harness::start(
        vec![job("backup", "0 */6 * * *", Tz::UTC)],
        utc(2026, 3, 1, 4, 0),
        Behaviour {
            takes: Duration::from_secs(300),
            ..Behaviour::default()
        },
    );
    h.pass(13.0).await;
    let (runner, runs) = h.stop().await;
    assert_eq!(
        runner.starts("backup"),
        [utc(2026, 3, 1, 6, 0), utc(2026, 3, 1, 12, 0)]
    );
    let summary: Vec<_> = runs
        .iter()
        .map(|r| {
            (
                r.started_at,
                r.finished_at,
                r.state,
                r.bytes,
                r.detail.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                utc(2026, 3, 1, 6, 0),
                Some(utc(2026, 3, 1, 6, 5)),
                RunState::Ok,
                Some(1024),
                Some("backup done")
            ),
            (
                utc(2026, 3, 1, 12, 0),
                Some(utc(2026, 3, 1, 12, 5)),
                RunState::Ok,
                Some(1024),
                Some("backup done")
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn fire_times_missed_while_down_run_once_at_start() {
    // Last run at 01:00; bite-sync starts again at 10:20, nine hourly fire times later.
    let h = Harness::with_history(
        vec![job("hourly", "0 * * * *", Tz::UTC)],
        utc(2026, 3, 1, 10, 20),
        Behaviour::default(),
        vec![history("hourly", utc(2026, 3, 1, 1, 0))],
    );
    h.pass(2.0).await;
    let (runner, runs) = h.stop().await;
    assert_eq!(
        runner.starts("hourly"),
        [
            utc(2026, 3, 1, 10, 20),
            utc(2026, 3, 1, 11, 0),
            utc(2026, 3, 1, 12, 0)
        ],
        "one catch-up run at start, then the schedule"
    );
    assert_eq!(runs.len(), 4, "the old record and three new ones");
}

#[tokio::test(start_paused = true)]
async fn no_catch_up_without_history_or_after_a_run_since_the_last_fire_time() {
    for history in [
        vec![],
        vec![history(
            "hourly",
            utc(2026, 3, 1, 10, 0) + TimeDelta::seconds(30),
        )],
    ] {
        let h = Harness::with_history(
            vec![job("hourly", "0 * * * *", Tz::UTC)],
            utc(2026, 3, 1, 10, 20),
            Behaviour::default(),
            history,
        );
        h.pass(2.0).await;
        let (runner, _) = h.stop().await;
        assert_eq!(
            runner.starts("hourly"),
            [utc(2026, 3, 1, 11, 0), utc(2026, 3, 1, 12, 0)]
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_run_still_going_at_the_next_fire_time_skips_it_and_never_overlaps() {
    // Hourly, but each run takes 90 minutes: the run started at 01:00 is still going at 02:00.
    let h = Harness::start(
        vec![job("slow", "0 * * * *", Tz::UTC)],
        utc(2026, 3, 1, 0, 30),
        Behaviour {
            takes: Duration::from_secs(90 * 60),
            ..Behaviour::default()
        },
    );
    h.pass(5.0).await;
    // Cancelled at 05:30 while the 05:00 run goes on: stop waits for it.
    let (runner, runs) = h.stop().await;
    assert_eq!(
        runner.starts("slow"),
        [
            utc(2026, 3, 1, 1, 0),
            utc(2026, 3, 1, 3, 0),
            utc(2026, 3, 1, 5, 0)
        ]
    );
    assert_eq!(runner.most_at_once("slow"), 1);
    let finished: Vec<_> = runs.iter().map(|r| (r.finished_at, r.state)).collect();
    assert_eq!(
        finished,
        [
            (Some(utc(2026, 3, 1, 2, 30)), RunState::Ok),
            (Some(utc(2026, 3, 1, 4, 30)), RunState::Ok),
            (Some(utc(2026, 3, 1, 6, 30)), RunState::Ok),
        ],
        "the run in progress at cancellation finished and was recorded"
    );
}

#[tokio::test(start_paused = true)]
async fn different_jobs_run_at_the_same_time() {
    let h = Harness::start(
        vec![
            job("a", "0 * * * *", Tz::UTC),
            job("b", "0 * * * *", Tz::UTC),
        ],
        utc(2026, 3, 1, 0, 30),
        Behaviour {
            takes: Duration::from_secs(600),
            ..Behaviour::default()
        },
    );
    h.pass(1.0).await;
    let (runner, _) = h.stop().await;
    assert_eq!(runner.starts("a"), [utc(2026, 3, 1, 1, 0)]);
    assert_eq!(runner.starts("b"), [utc(2026, 3, 1, 1, 0)]);
    assert_eq!(runner.total.lock().unwrap().1, 2);
}

#[tokio::test(start_paused = true)]
async fn spring_forward_runs_at_the_right_utc_instants() {
    // New York skips 02:00-03:00 on 8 March 2026; Madrid skips 02:00-03:00 on 29 March.
    let ny: Tz = "America/New_York".parse().unwrap();
    let madrid: Tz = "Europe/Madrid".parse().unwrap();
    let h = Harness::start(
        vec![
            job("ny-0230", "30 2 * * *", ny),
            job("ny-6h", "0 */6 * * *", ny),
        ],
        utc(2026, 3, 7, 0, 0),
        Behaviour::default(),
    );
    h.pass(72.0).await;
    let (runner, _) = h.stop().await;
    assert_eq!(
        runner.starts("ny-0230"),
        [
            utc(2026, 3, 7, 7, 30), // 02:30 EST
            utc(2026, 3, 8, 7, 0),  // 02:30 does not exist: 03:00 EDT, once
            utc(2026, 3, 9, 6, 30), // 02:30 EDT
        ]
    );
    let local_hours: Vec<String> = runner
        .starts("ny-6h")
        .iter()
        .map(|t| t.with_timezone(&ny).format("%d %H:%M").to_string())
        .collect();
    assert_eq!(
        local_hours,
        [
            "07 00:00", "07 06:00", "07 12:00", "07 18:00", "08 00:00", "08 06:00", "08 12:00",
            "08 18:00", "09 00:00", "09 06:00", "09 12:00", "09 18:00"
        ]
    );
    // Across the change, 00:00 EST to 06:00 EDT is 5 real hours.
    let s = runner.starts("ny-6h");
    assert_eq!(s[5] - s[4], TimeDelta::hours(5));

    let h = Harness::start(
        vec![job("madrid-0230", "30 2 * * *", madrid)],
        utc(2026, 3, 28, 0, 0),
        Behaviour::default(),
    );
    h.pass(48.0).await;
    let (runner, _) = h.stop().await;
    assert_eq!(
        runner.starts("madrid-0230"),
        [
            utc(2026, 3, 28, 1, 30), // 02:30 CET
            utc(2026, 3, 29, 1, 0),  // 03:00 CEST, right after the jump
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn fall_back_runs_a_fixed_time_once_and_an_interval_at_real_intervals() {
    // New York repeats 01:00-02:00 on 1 November 2026 (EDT, then EST).
    let ny: Tz = "America/New_York".parse().unwrap();
    let h = Harness::start(
        vec![
            job("ny-0130", "30 1 * * *", ny),
            job("ny-half-hourly", "*/30 1 * * *", ny),
        ],
        utc(2026, 10, 31, 12, 0),
        Behaviour::default(),
    );
    h.pass(48.0).await;
    let (runner, _) = h.stop().await;
    assert_eq!(
        runner.starts("ny-0130"),
        [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)],
        "01:30 EDT only, not again at 01:30 EST"
    );
    assert_eq!(
        runner.starts("ny-half-hourly"),
        [
            utc(2026, 11, 1, 5, 0),  // 01:00 EDT
            utc(2026, 11, 1, 5, 30), // 01:30 EDT
            utc(2026, 11, 1, 6, 0),  // 01:00 EST
            utc(2026, 11, 1, 6, 30), // 01:30 EST
            utc(2026, 11, 2, 6, 0),
            utc(2026, 11, 2, 6, 30),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn failed_runs_are_recorded_and_the_schedule_goes_on() {
    let h = Harness::start(
        vec![job("flaky", "0 * * * *", Tz::UTC)],
        utc(2026, 3, 1, 0, 30),
        Behaviour {
            fails_with: Some("disk full".into()),
            ..Behaviour::default()
        },
    );
    h.pass(3.0).await;
    let (runner, runs) = h.stop().await;
    assert_eq!(runner.starts("flaky").len(), 3);
    let states: Vec<_> = runs
        .iter()
        .map(|r| (r.state, r.detail.as_deref()))
        .collect();
    assert_eq!(states, [(RunState::Failed, Some("disk full")); 3]);

    let h = Harness::start(
        vec![job("panicky", "0 * * * *", Tz::UTC)],
        utc(2026, 3, 1, 0, 30),
        Behaviour {
            panics: true,
            ..Behaviour::default()
        },
    );
    h.pass(2.0).await;
    let (runner, runs) = h.stop().await;
    assert_eq!(runner.starts("panicky").len(), 2);
    let states: Vec<_> = runs
        .iter()
        .map(|r| (r.state, r.detail.as_deref()))
        .collect();
    assert_eq!(
        states,
        [(RunState::Failed, Some("the job panicked: boom")); 2]
    );
}

#[tokio::test(start_paused = true)]
async fn a_disabled_job_never_runs_not_even_to_catch_up() {
    let mut disabled = job("off", "0 * * * *", Tz::UTC);
    disabled.enabled = false;
    let h = Harness::with_history(
        vec![disabled, job("on", "0 0 * * *", Tz::UTC)],
        utc(2026, 3, 1, 0, 30),
        Behaviour::default(),
        vec![history("off", utc(2026, 2, 1, 0, 0))],
    );
    h.pass(48.0).await;
    let (runner, runs) = h.stop().await;
    assert!(runner.starts("off").is_empty());
    assert_eq!(runner.starts("on").len(), 2, "the enabled job did run");
    assert_eq!(
        runs.iter().filter(|r| r.job == "off").count(),
        1,
        "only the old record"
    );
}

#[tokio::test(start_paused = true)]
async fn cancellation_stops_a_sleeping_schedule_at_once() {
    let h = Harness::start(
        vec![job("daily", "0 3 * * *", Tz::UTC)],
        utc(2026, 3, 1, 4, 0),
        Behaviour::default(),
    );
    h.pass(1.0).await;
    let before = tokio::time::Instant::now();
    let (runner, _) = h.stop().await;
    assert_eq!(
        before.elapsed(),
        Duration::ZERO,
        "no time passed while stopping"
    );
    assert!(runner.starts("daily").is_empty());
}

/// A history that cannot be read or written (the mirror is down).
struct BrokenLog;

impl RunLog for BrokenLog {
    fn last_run<'a>(
        &'a self,
        _job: &'a str,
    ) -> BoxFuture<'a, Result<Option<RunRecord>, RunLogError>> {
        Box::pin(async { Err(RunLogError::UnknownRun(RunId(0))) })
    }

    fn record_start<'a>(
        &'a self,
        _job: &'a str,
        _started: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<RunId, RunLogError>> {
        Box::pin(async { Err(RunLogError::UnknownRun(RunId(0))) })
    }

    fn record_end(
        &self,
        id: RunId,
        _finished: DateTime<Utc>,
        _outcome: Result<JobOutcome, String>,
    ) -> BoxFuture<'_, Result<(), RunLogError>> {
        Box::pin(async move { Err(RunLogError::UnknownRun(id)) })
    }
}

#[tokio::test(start_paused = true)]
async fn jobs_still_run_when_the_history_cannot_be_written() {
    let h = Harness::with_log(
        vec![job("backup", "0 */6 * * *", Tz::UTC)],
        utc(2026, 3, 1, 4, 0),
        Behaviour::default(),
        Arc::new(BrokenLog),
        None,
    );
    h.pass(13.0).await;
    let (runner, _) = h.stop().await;
    assert_eq!(
        runner.starts("backup"),
        [utc(2026, 3, 1, 6, 0), utc(2026, 3, 1, 12, 0)]
    );
}
