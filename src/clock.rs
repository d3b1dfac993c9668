//! Time as a parameter: the breaker, the coalescing window and the restart budget read the
//! time from a [`Clock`] in the controller's context, so tests move a [`ManualClock`] instead
//! of sleeping.

use std::sync::Mutex;
use std::time::Duration;

/// Where the controllers read the current time.
pub trait Clock: Send + Sync {
    fn now(&self) -> jiff::Timestamp;
}

/// The wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> jiff::Timestamp {
        jiff::Timestamp::now()
    }
}

/// A clock that moves only when told (tests, benches).
#[derive(Debug)]
pub struct ManualClock(Mutex<jiff::Timestamp>);

impl ManualClock {
    pub fn new(start: jiff::Timestamp) -> Self {
        ManualClock(Mutex::new(start))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap();
        *now += jiff::SignedDuration::try_from(by).expect("a test duration fits");
    }
}

impl Default for ManualClock {
    /// Starts at the current second of the wall clock, so that times it writes look real.
    fn default() -> Self {
        let secs = jiff::Timestamp::now().as_second();
        ManualClock::new(jiff::Timestamp::from_second(secs).expect("now is a valid timestamp"))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> jiff::Timestamp {
        *self.0.lock().unwrap()
    }
}
