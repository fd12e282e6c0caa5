"""Test support code: a private Dovecot launcher and sample messages."""
