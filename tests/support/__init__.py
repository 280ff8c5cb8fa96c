"""Helpers the tests share: experiment builders, loopback ports, Ray clean-up and a faulty S3 proxy."""
