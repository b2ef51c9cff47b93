"""Images and big bodies: lifting big strings before parsing, preparing images in the CPU pool,
history trimming.
"""
