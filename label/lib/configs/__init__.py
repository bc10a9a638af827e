"""Task configurations of the spinepath MONAI Label app."""
