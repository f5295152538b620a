//! Which of a run's building tasks may start next.
//!
//! Building a run's tables is a small graph of tasks: load a table (create + COPY), build each
//! of its indexes, attach its keys, add its foreign keys. A task may start once the tasks it
//! depends on have finished; indexes of one table are separate tasks, so idle workers build
//! them side by side. Among the ready tasks a worker takes the one with the longest chain of
//! work still behind it (its "bottom level", by estimated cost), the classic list-scheduling
//! rule that starts the critical path — usually the biggest table's load — first.
//!
//! Pure bookkeeping, no I/O: the workers in [`super`] do the work.

/// One task of the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node<T> {
    /// What to do.
    pub work: T,
    /// Indexes of the tasks that must finish first.
    pub after: Vec<usize>,
    /// Estimated cost, in any unit shared by all tasks (bytes to scan, say).
    pub cost: u64,
}

/// What a worker should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Run the task with this index.
    Run(usize),
    /// Nothing is ready, but running tasks may make some ready when they end.
    Wait,
    /// Nothing is left.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Running,
    Finished,
}

/// The state of a run's tasks.
#[derive(Debug, Clone)]
pub struct Tasks<T> {
    nodes: Vec<Node<T>>,
    state: Vec<State>,
    /// Cost of the longest chain from each task to the end, itself included.
    bottom: Vec<u64>,
    running: usize,
    stopped: bool,
}

impl<T> Tasks<T> {
    /// A graph of tasks. Dependencies must point to earlier tasks; any others are ignored, so
    /// the graph cannot have cycles.
    pub fn new(nodes: Vec<Node<T>>) -> Self {
        let mut bottom: Vec<u64> = nodes.iter().map(|n| n.cost).collect();
        // Dependencies point backwards, so walking from the end settles each task's
        // successors before the task itself.
        for i in (0..nodes.len()).rev() {
            for &d in &nodes[i].after {
                if d < i {
                    bottom[d] = bottom[d].max(nodes[d].cost + bottom[i]);
                }
            }
        }
        Self {
            state: vec![State::Pending; nodes.len()],
            nodes,
            bottom,
            running: 0,
            stopped: false,
        }
    }

    /// The work of task `i`.
    pub fn work(&self, i: usize) -> &T {
        &self.nodes[i].work
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
        let ready = (0..self.nodes.len())
            .filter(|&i| self.state[i] == State::Pending)
            .filter(|&i| {
                self.nodes[i]
                    .after
                    .iter()
                    .all(|&d| d >= i || self.state[d] == State::Finished)
            })
            .max_by_key(|&i| (self.bottom[i], std::cmp::Reverse(i)));
        match ready {
            Some(i) => {
                self.state[i] = State::Running;
                self.running += 1;
                Next::Run(i)
            }
            None if self.running > 0 => Next::Wait,
            None => Next::Done,
        }
    }

    /// Task `i` ended successfully.
    pub fn finished(&mut self, i: usize) {
        self.state[i] = State::Finished;
        self.running -= 1;
    }

    /// Task `i` failed: hand out no more work.
    pub fn stop(&mut self, i: usize) {
        self.state[i] = State::Finished;
        self.running -= 1;
        self.stopped = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(work: &'static str, after: &[usize], cost: u64) -> Node<&'static str> {
        Node {
            work,
            after: after.to_vec(),
            cost,
        }
    }

    /// Simulates `workers` workers on the graph with costs as durations; returns each task's
    /// start time and the makespan.
    fn simulate(
        tasks: &mut Tasks<&'static str>,
        workers: usize,
    ) -> (Vec<(u64, &'static str)>, u64) {
        let mut now = 0;
        let mut running: Vec<(u64, usize)> = Vec::new(); // (ends at, task)
        let mut starts = Vec::new();
        loop {
            while running.len() < workers {
                match tasks.next_task() {
                    Next::Run(i) => {
                        starts.push((now, *tasks.work(i)));
                        running.push((now + tasks.nodes[i].cost, i));
                    }
                    Next::Wait => break,
                    Next::Done => return (starts, now),
                }
            }
            running.sort();
            let (end, i) = running.remove(0);
            now = end;
            tasks.finished(i);
        }
    }

    #[test]
    fn the_critical_path_starts_first_and_dependencies_hold() {
        // customers (small), orders -> customers, order_items (big) -> orders.
        let mut tasks = Tasks::new(vec![
            node("load customers", &[], 10),  // 0
            node("index customers", &[0], 5), // 1
            node("load orders", &[], 100),    // 2
            node("index orders a", &[2], 40), // 3
            node("index orders b", &[2], 40), // 4
            node("keys orders", &[3, 4], 1),  // 5
            node("load items", &[], 300),     // 6
            node("index items", &[6], 120),   // 7
            node("keys items", &[7], 1),      // 8
            node("fk orders", &[5, 1], 50),   // 9
            node("fk items", &[8, 5], 150),   // 10
        ]);
        let (starts, makespan) = simulate(&mut tasks, 2);
        assert_eq!(starts[0], (0, "load items"));
        let start = |w: &str| starts.iter().find(|(_, s)| *s == w).unwrap().0;
        assert!(
            start("index orders a") >= 100 && start("keys orders") >= start("index orders b") + 40
        );
        assert!(start("fk items") > start("keys items"));
        // The big chain (300 + 120 + 1 + 150) bounds the run; the rest fits beside it.
        assert_eq!(makespan, 571);
    }

    #[test]
    fn workers_wait_for_dependencies_and_stop_on_failure() {
        let mut tasks = Tasks::new(vec![node("a", &[], 1), node("b", &[0], 1)]);
        assert_eq!(tasks.next_task(), Next::Run(0));
        assert_eq!(tasks.next_task(), Next::Wait);
        tasks.finished(0);
        assert_eq!(tasks.next_task(), Next::Run(1));
        tasks.finished(1);
        assert_eq!(tasks.next_task(), Next::Done);

        let mut failing = Tasks::new(vec![
            node("a", &[], 1),
            node("b", &[], 1),
            node("c", &[], 1),
        ]);
        let first = failing.next_task();
        assert!(matches!(first, Next::Run(_)));
        assert!(matches!(failing.next_task(), Next::Run(_)));
        if let Next::Run(i) = first {
            failing.stop(i);
        }
        assert_eq!(failing.next_task(), Next::Wait, "the other task still runs");
    }

    #[test]
    fn forward_dependencies_cannot_deadlock() {
        let mut tasks = Tasks::new(vec![node("a", &[1], 1), node("b", &[0], 1)]);
        assert_eq!(tasks.next_task(), Next::Run(0));
        tasks.finished(0);
        assert_eq!(tasks.next_task(), Next::Run(1));
    }
}
