"""Generated from proto/ by tools/gen_proto.py (`make proto`). Do not edit."""
