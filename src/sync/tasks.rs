//! Which of a run's building tasks may start next.
//!
//! A run has two kinds of task: building a staged table (create, copy, keys, indexes) and
//! adding a table's foreign keys to other staged tables (which validates them, scanning the
//! table). A foreign-key task can start once its table and every staged table it references
//! are built. Workers ask [`Tasks::next_task`] for work; ready foreign-key tasks go first (they are
//! the tail of the run), then builds, biggest table first, so the longest copy starts early.
//!
//! Pure bookkeeping, no I/O: the workers in [`super`] do the work.

use std::collections::BTreeSet;

/// One unit of work, naming tables by their index in the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Task {
    /// Build staged table `i`.
    Build(usize),
    /// Add the foreign keys of table `i`.
    ForeignKeys(usize),
}

/// What a worker should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Run this task.
    Run(Task),
    /// Nothing is ready, but tasks are still running whose end may make some ready.
    Wait,
    /// Nothing is left.
    Done,
}

/// The state of a run's tasks.
#[derive(Debug, Clone)]
pub struct Tasks {
    /// Builds not started, biggest last (popped first).
    builds: Vec<usize>,
    /// Foreign-key tasks not started: (table, tables it waits for).
    keys: Vec<(usize, BTreeSet<usize>)>,
    built: BTreeSet<usize>,
    running: usize,
    stopped: bool,
}

impl Tasks {
    /// `builds`: (table, size) of every table to build; `keys`: (table, referenced staged
    /// tables) of every table with foreign keys to add.
    pub fn new(builds: &[(usize, i64)], keys: Vec<(usize, BTreeSet<usize>)>) -> Self {
        let mut by_size = builds.to_vec();
        by_size.sort_by_key(|&(i, size)| (size, std::cmp::Reverse(i)));
        Self {
            builds: by_size.into_iter().map(|(i, _)| i).collect(),
            keys,
            built: BTreeSet::new(),
            running: 0,
            stopped: false,
        }
    }

    /// The next task for an idle worker.
    pub fn next_task(&mut self) -> Next {
        if self.stopped {
            return if self.running == 0 {
                Next::Done
            } else {
                Next::Wait
            };
        }
        let ready = self.keys.iter().position(|(table, waits)| {
            self.built.contains(table) && waits.iter().all(|w| self.built.contains(w))
        });
        if let Some(at) = ready {
            let (table, _) = self.keys.remove(at);
            self.running += 1;
            return Next::Run(Task::ForeignKeys(table));
        }
        if let Some(table) = self.builds.pop() {
            self.running += 1;
            return Next::Run(Task::Build(table));
        }
        if self.running > 0 {
            Next::Wait
        } else if self.keys.is_empty() {
            Next::Done
        } else {
            // Keys waiting for tables that will never be built: a planning bug; stop rather
            // than hang.
            self.keys.clear();
            Next::Done
        }
    }

    /// A task ended successfully.
    pub fn finished(&mut self, task: Task) {
        self.running -= 1;
        if let Task::Build(i) = task {
            self.built.insert(i);
        }
    }

    /// A task failed: hand out no more work.
    pub fn stop(&mut self) {
        self.running -= 1;
        self.stopped = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_all(tasks: &mut Tasks) -> Vec<Task> {
        let mut order = Vec::new();
        loop {
            match tasks.next_task() {
                Next::Run(t) => {
                    order.push(t);
                    tasks.finished(t);
                }
                Next::Wait => panic!("single worker never waits"),
                Next::Done => return order,
            }
        }
    }

    #[test]
    fn biggest_first_and_keys_after_their_tables() {
        // 0 customers (small), 1 orders -> 0, 2 order_items (biggest) -> 1, 3
        let mut tasks = Tasks::new(
            &[(0, 10), (1, 100), (2, 300), (3, 1)],
            vec![(1, BTreeSet::from([0])), (2, BTreeSet::from([1, 3]))],
        );
        let order = run_all(&mut tasks);
        assert_eq!(
            order,
            vec![
                Task::Build(2),
                Task::Build(1),
                Task::Build(0),
                Task::ForeignKeys(1),
                Task::Build(3),
                Task::ForeignKeys(2),
            ]
        );
    }

    #[test]
    fn workers_wait_while_dependencies_run_and_stop_on_failure() {
        let mut tasks = Tasks::new(&[(0, 1)], vec![(0, BTreeSet::from([0]))]);
        let first = tasks.next_task();
        assert_eq!(first, Next::Run(Task::Build(0)));
        assert_eq!(tasks.next_task(), Next::Wait);
        tasks.finished(Task::Build(0));
        assert_eq!(tasks.next_task(), Next::Run(Task::ForeignKeys(0)));
        tasks.finished(Task::ForeignKeys(0));
        assert_eq!(tasks.next_task(), Next::Done);

        let mut failing = Tasks::new(&[(0, 1), (1, 1)], vec![]);
        assert!(matches!(failing.next_task(), Next::Run(_)));
        assert!(matches!(failing.next_task(), Next::Run(_)));
        failing.stop();
        assert_eq!(failing.next_task(), Next::Wait);
        failing.finished(Task::Build(1));
        assert_eq!(failing.next_task(), Next::Done);
    }
}
