"""netdrop: drops and delays a fraction of inbound SMTP segments (NFQUEUE)."""
