"""Test support shared by every package's tests: fake engines and servers on 127.0.0.1."""
