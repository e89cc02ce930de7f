//! `memory_budget`: work on untrusted input stopped at a heap limit with an error, not an
//! abort, and a chat template from a model file rendered within it. This test binary installs
//! the budgeted allocator, as the `tandem` binary and the Python module do.

use std::path::Path;
use std::time::Duration;
use tandem_model::chat::{ChatTemplate, Message};
use tandem_model::memory_budget::{is_enforced, run_within, BudgetAllocator, BudgetError};

#[global_allocator]
static ALLOCATOR: BudgetAllocator = BudgetAllocator;

const LIMIT: usize = 64 << 20;
const STACK: usize = 2 << 20;
const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn work_within_the_limit_returns_its_value() {
    let v = run_within(LIMIT, STACK, DEADLINE, || {
        (0..1000u64).map(|i| i.to_string()).collect::<Vec<_>>()
    });
    assert!(is_enforced());
    assert_eq!(v.unwrap()[999], "999");
    // Memory freed as it goes does not count: 100 × 16 MiB, one at a time.
    let total = run_within(LIMIT, STACK, DEADLINE, || {
        (0..100).map(|_| vec![1u8; 16 << 20].len()).sum::<usize>()
    });
    assert_eq!(total, Ok(1600 << 20));
}

#[test]
fn growth_past_the_limit_stops_the_work() {
    let grown = run_within(LIMIT, STACK, DEADLINE, || {
        let mut v = vec![0u8; 1 << 20];
        for _ in 0..40 {
            let copy = v.clone();
            v.extend_from_slice(&copy);
        }
        v.len()
    });
    assert_eq!(grown, Err(BudgetError::Exceeded { limit: LIMIT }));
    // One request far past the limit (and past any machine's memory) is refused before the
    // system allocator sees it, so it cannot abort the process.
    let huge = run_within(LIMIT, STACK, DEADLINE, || {
        Vec::<u64>::with_capacity(1 << 40).capacity()
    });
    assert_eq!(huge, Err(BudgetError::Exceeded { limit: LIMIT }));
    assert_eq!(
        BudgetError::Exceeded { limit: LIMIT }.to_string(),
        "needed more than 64 MiB of memory"
    );
    // The process goes on: the next budgeted work runs on a fresh thread.
    assert_eq!(
        run_within(LIMIT, STACK, DEADLINE, || vec![7u8; 1 << 20][5]),
        Ok(7)
    );
}

#[test]
fn work_past_its_deadline_is_abandoned_and_stops_at_its_next_allocation() {
    let started = std::time::Instant::now();
    let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let seen = std::sync::Arc::clone(&stopped);
    let late = run_within(LIMIT, STACK, Duration::from_millis(200), move || {
        // Runs for ever unless stopped; every round allocates.
        loop {
            seen.store(false, std::sync::atomic::Ordering::SeqCst);
            std::hint::black_box(vec![0u8; 64]);
        }
    });
    let after = Duration::from_millis(200);
    assert_eq!(late, Err::<(), _>(BudgetError::TimedOut { after }));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        BudgetError::TimedOut { after }.to_string(),
        "took more than 0.2 s"
    );
    // Stopped at its next allocation: the flag it clears each round stays set.
    std::thread::sleep(Duration::from_millis(50));
    stopped.store(true, std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    assert!(stopped.load(std::sync::atomic::Ordering::SeqCst));
}

#[test]
fn a_panic_in_the_work_reaches_the_caller() {
    let caught = std::panic::catch_unwind(|| {
        run_within(LIMIT, STACK, DEADLINE, || -> u8 { panic!("inside") })
    });
    let payload = caught.expect_err("the panic was lost");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"inside"));
}

/// A panic message whose formatting allocates past the limit: the panic hook formats it
/// while holding process-wide locks, as it resolves a backtrace's symbols with
/// RUST_BACKTRACE set (which took more than 64 MiB with debug info), so the budget must not
/// stop the thread there: it would hang every later panic in the process.
#[test]
fn a_panic_that_allocates_past_the_limit_still_reaches_the_caller() {
    struct Heavy;
    impl std::fmt::Display for Heavy {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let scratch = std::hint::black_box(vec![1u8; 2 << 20]);
            write!(f, "heavy {}", scratch.len())
        }
    }
    let caught = std::panic::catch_unwind(|| {
        run_within(1 << 20, STACK, DEADLINE, || -> u8 { panic!("{}", Heavy) })
    });
    let payload = caught.expect_err("the panic was lost");
    assert_eq!(
        payload.downcast_ref::<String>().map(String::as_str),
        Some("heavy 2097152")
    );
}

/// ChatML as SmolLM2-Instruct writes it, without its default system prompt.
const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n\
    {{ message['content'] }}<|im_end|>\n{% endfor %}\
    {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[test]
fn a_real_template_renders_and_hostile_ones_fail_naming_their_source() {
    let label = Path::new("model.gguf");
    let t = ChatTemplate::new(label, CHATML, "<s>", "</s>").unwrap();
    let text = t
        .render(
            &[
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // A long conversation stays far inside both limits.
    let long: Vec<Message> = (0..20_000)
        .map(|i| Message::new(["user", "assistant"][i % 2], "a few words of a turn"))
        .collect();
    assert!(t.render(&long, true).unwrap().len() > 20_000 * 30);

    let hostile = [
        (
            "{% set ns = namespace(s=[1]) %}{% for i in range(40) %}\
             {% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
            "MiB of memory",
        ),
        (
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}\
             {% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            "MiB of memory",
        ),
        (
            "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
            "out of fuel",
        ),
        (
            // 2^21 items, tested 90,000 times: little fuel, 1.9·10¹¹ comparisons.
            "{% set ns = namespace(b=[1]) %}{% for i in range(21) %}{% set ns.b = ns.b + ns.b %}\
             {% endfor %}{% set big = ns.b|list %}{% for i in range(300) %}{% for j in range(300) %}\
             {% if 5 in big %}{% endif %}{% endfor %}{% endfor %}",
            "took more than 5 s",
        ),
        (
            "{% for i in range(99999) %}{{ 'hello world ' * 170 }}{% endfor %}",
            "more than 1048784 bytes of text from 13 bytes of messages",
        ),
    ];
    // Values nested 90,000 deep are dropped and printed on the rendering's own stack (they
    // overflowed the 2 MiB default and aborted the process).
    let deep = "{% set ns = namespace(x=[]) %}{% for i in range(300) %}{% for j in range(300) %}\
                {% set ns.x = [ns.x] %}{% endfor %}{% endfor %}";
    for (tail, len) in [("x", 1), ("{{ ns.x }}", 180_002)] {
        let t = ChatTemplate::new(label, &format!("{deep}{tail}"), "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "Hi")], true).unwrap().len(),
            len
        );
    }
    // A source past 1 MiB is refused before it is compiled.
    let huge = "{{ messages|length }}".repeat(100_000);
    let err = ChatTemplate::new(label, &huge, "", "")
        .err()
        .expect("compiled");
    assert!(
        err.to_string()
            .contains("chat template of 2100000 bytes is longer than 1048576"),
        "{err}"
    );
    for (source, needle) in hostile {
        let t = ChatTemplate::new(label, source, "<s>", "</s>").unwrap();
        let err = t.render(&[Message::new("user", "Hi")], true).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("model.gguf: chat template: ") && msg.contains(needle),
            "{msg}"
        );
    }
}
