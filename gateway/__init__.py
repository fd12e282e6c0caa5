"""popgate: POP3 and SMTP submission for legacy devices, over an upstream IMAP mailbox."""

__version__ = "0.1.0"
