//! CPUs, for tests of per-CPU state: the connection tables keep one LRU list per CPU, and a
//! packet sent from a veth in a test is handled by the XDP program on the sender's CPU.

/// CPUs the kernel sizes per-CPU maps for (`/sys/devices/system/cpu/possible`, e.g. "0-1").
pub fn possible() -> usize {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").expect("reading the possible CPUs");
    text.trim()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// Runs the calling thread on `cpu` only, so the packets it sends meet that CPU's LRU list.
pub fn pin_current_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity get valid
    // references to it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0, "pinning to CPU {cpu}");
    }
}
