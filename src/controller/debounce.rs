//! When the next pass runs: after a quiet period with no new input (so a burst of events is one
//! recompute and one write per object), but never later than a maximum delay after the first
//! input it groups (so a steady stream of events cannot postpone every pass). Without input, a
//! pass still runs every tick, for health and retries.

use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct Debounce {
    quiet: Duration,
    max: Duration,
    /// The first and the last input since the last pass.
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Debounce {
    pub fn new(quiet: Duration, max: Duration) -> Self {
        Debounce { quiet, max: max.max(quiet), first: None, last: None }
    }

    pub fn input(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When the pass for the inputs seen so far is due.
    pub fn due(&self) -> Option<Instant> {
        Some((self.last? + self.quiet).min(self.first? + self.max))
    }

    /// A pass starts: it takes everything seen so far.
    pub fn pass(&mut self) {
        self.first = None;
        self.last = None;
    }
}

/// What the loop drives: handling one input, and a pass.
pub trait Driven {
    type Input;
    fn handle(&mut self, input: Self::Input) -> impl std::future::Future<Output = ()>;
    fn pass(&mut self) -> impl std::future::Future<Output = ()>;
    /// How many inputs wait in the channel as a pass starts (a measure of lag).
    fn queued(&mut self, _depth: usize) {}
}

/// Handles inputs as they arrive and runs a pass when `debounce` says it is due, or every `tick`
/// when nothing arrives; until `shutdown` resolves or the channel closes.
pub async fn drive<D: Driven>(
    driven: &mut D,
    rx: &mut UnboundedReceiver<D::Input>,
    debounce: &mut Debounce,
    tick: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut next_tick = Instant::now() + tick;
    loop {
        let wake = debounce.due().unwrap_or(next_tick).min(next_tick);
        tokio::select! {
            biased;
            _ = &mut shutdown => return,
            // A pass that is due goes before more input: inputs keep arriving while it waits.
            _ = tokio::time::sleep_until(wake) => {
                debounce.pass();
                next_tick = Instant::now() + tick;
                driven.queued(rx.len());
                driven.pass().await;
            }
            input = rx.recv() => {
                let Some(input) = input else { return };
                debounce.input(Instant::now());
                driven.handle(input).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::unbounded_channel;

    const QUIET: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(1);
    const TICK: Duration = Duration::from_secs(1);

    #[test]
    fn a_burst_waits_for_quiet_but_never_past_the_maximum() {
        let t0 = Instant::now();
        let mut d = Debounce::new(QUIET, MAX);
        assert_eq!(d.due(), None);
        d.input(t0);
        assert_eq!(d.due(), Some(t0 + QUIET));
        d.input(t0 + Duration::from_millis(30));
        assert_eq!(d.due(), Some(t0 + Duration::from_millis(80)), "quiet counts from the last input");
        d.input(t0 + Duration::from_millis(990));
        assert_eq!(d.due(), Some(t0 + MAX), "the first input waits at most MAX");
        d.pass();
        assert_eq!(d.due(), None);
    }

    /// Records when passes ran and how many inputs each saw.
    struct Recorder {
        started: Instant,
        inputs: usize,
        passes: Vec<(Duration, usize)>,
    }

    impl Driven for Recorder {
        type Input = ();
        async fn handle(&mut self, _: ()) {
            self.inputs += 1;
        }
        async fn pass(&mut self) {
            self.passes.push((self.started.elapsed(), self.inputs));
            self.inputs = 0;
        }
    }

    /// An event every 10 ms for 3.5 s, well inside the 50 ms quiet period: the loop still passes
    /// within every second, and every event is handled before a pass that takes it.
    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_of_events_still_gets_a_pass_within_the_maximum_delay() {
        let (tx, mut rx) = unbounded_channel();
        tokio::spawn(async move {
            for _ in 0..350 {
                if tx.send(()).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let mut recorder = Recorder { started: Instant::now(), inputs: 0, passes: Vec::new() };
        let mut debounce = Debounce::new(QUIET, MAX);
        let stop = tokio::time::sleep(Duration::from_secs(4));
        drive(&mut recorder, &mut rx, &mut debounce, TICK, stop).await;
        let during: Vec<Duration> =
            recorder.passes.iter().map(|(at, _)| *at).filter(|at| *at < Duration::from_millis(3500)).collect();
        assert!(during.len() >= 3, "passes while events kept coming: {:?}", recorder.passes);
        let mut previous = Duration::ZERO;
        for at in &during {
            assert!(
                *at - previous <= MAX + Duration::from_millis(10),
                "a gap longer than the maximum delay: {:?}",
                recorder.passes
            );
            previous = *at;
        }
        let seen: usize = recorder.passes.iter().map(|(_, n)| n).sum();
        assert_eq!(seen + recorder.inputs, 350, "every event was handled");
    }

    #[tokio::test(start_paused = true)]
    async fn without_input_a_pass_runs_every_tick() {
        let (_tx, mut rx) = unbounded_channel::<()>();
        let mut recorder = Recorder { started: Instant::now(), inputs: 0, passes: Vec::new() };
        let mut debounce = Debounce::new(QUIET, MAX);
        drive(&mut recorder, &mut rx, &mut debounce, TICK, tokio::time::sleep(Duration::from_millis(3500))).await;
        let at: Vec<u128> = recorder.passes.iter().map(|(at, _)| at.as_millis()).collect();
        assert_eq!(at, [1000, 2000, 3000]);
    }
}
