"""Process plumbing shared by every service: stream service, listen specs, sd_notify, logging."""
