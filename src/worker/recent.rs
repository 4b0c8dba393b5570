//! The last steps' statistics that progress reports average (loss, accuracies): one window
//! for pre-training and fine-tuning alike.

use std::collections::VecDeque;

/// Steps a reported loss or accuracy is averaged over.
pub(crate) const RECENT_STEPS: usize = 20;

/// The statistics of the last [`RECENT_STEPS`] steps, oldest first.
pub(crate) struct Recent<T>(VecDeque<T>);

impl<T> Recent<T> {
    pub(crate) fn new() -> Self {
        Recent(VecDeque::with_capacity(RECENT_STEPS + 1))
    }

    /// Adds a step, forgetting the oldest beyond the window.
    pub(crate) fn push(&mut self, step: T) {
        self.0.push_back(step);
        if self.0.len() > RECENT_STEPS {
            self.0.pop_front();
        }
    }
}

impl<T> std::ops::Deref for Recent<T> {
    type Target = VecDeque<T>;
    fn deref(&self) -> &VecDeque<T> {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_steps() {
        let mut r = Recent::new();
        (0..25).for_each(|i| r.push(i));
        assert_eq!(r.len(), RECENT_STEPS);
        assert_eq!((r.front(), r.back()), (Some(&5), Some(&24)));
    }
}
