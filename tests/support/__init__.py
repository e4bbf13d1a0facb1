"""What the tests share: harnesses for the daemon, a registry and its faults, image builders, a stand-in
API server for kubectl, message fuzzers, and the host facts and clean-ups tests of the real stack need."""
